-- Removes a node from the registry only if it is still dead: a node that came back between the check
-- and the reap keeps its registration. Dead from the deadline on, as everywhere (see node_beat.lua).
--
-- KEYS[1]  node registry sorted set node_id -> deadline (unix ms, Redis time)
-- ARGV[1]  node id
--
-- Returns 1 when the node was removed.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
if deadline and tonumber(deadline) <= now then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
