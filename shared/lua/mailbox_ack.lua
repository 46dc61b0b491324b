-- Moves the user's read cursor ("acked") forward; it never moves back and never passes the last seq.
-- An ack from another epoch is ignored: that sequence no longer exists.
--
-- KEYS[1]  user meta hash {seq, epoch, acked}
-- ARGV[1]  epoch the client acknowledges in
-- ARGV[2]  acknowledged seq (cumulative)
--
-- Returns the cursor after the update (-1 when the epoch did not match).
local state = redis.call('HMGET', KEYS[1], 'epoch', 'seq', 'acked')
if state[1] ~= ARGV[1] then
  return -1
end
local last = tonumber(state[2]) or 0
local acked = tonumber(state[3]) or 0
local want = math.min(tonumber(ARGV[2]), last)
if want > acked then
  redis.call('HSET', KEYS[1], 'acked', want)
  return want
end
return acked
