-- Opens a user's sequence for a new connection: creates the epoch if there is none and refreshes the
-- TTL, so the welcome frame can name the epoch before any message was ever sent.
--
-- KEYS[1]  user meta hash {seq, epoch, acked}
-- KEYS[2]  user mailbox stream
-- ARGV[1]  mailbox / meta TTL in seconds
--
-- Returns {epoch, seq, acked}.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  local t = redis.call('TIME')
  epoch = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0, 'acked', 0)
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
local state = redis.call('HMGET', KEYS[1], 'seq', 'acked')
return {epoch, tonumber(state[1]) or 0, tonumber(state[2]) or 0}
