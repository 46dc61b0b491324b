-- The node registry as seen now, on Redis's clock, so callers can tell live from dead nodes locally.
--
-- KEYS[1]  node registry sorted set node_id -> deadline (unix ms, Redis time)
--
-- Returns {now_ms, {node, deadline, node, deadline, ...}}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {now, redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')}
