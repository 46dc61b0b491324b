-- One heartbeat of a gateway node: moves its deadline forward in the node registry, on Redis's clock so
-- that node and router clocks never need to agree.
--
-- KEYS[1]  node registry sorted set node_id -> deadline (unix ms, Redis time)
-- ARGV[1]  node id
-- ARGV[2]  milliseconds until the node counts as dead (2 heartbeat intervals)
--
-- Returns {was_absent (1 when the node was not registered: first beat, or Redis lost it, or it was
-- reaped as dead), now_ms, dead node ids (deadline passed) ...}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local added = redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. now, 'LIMIT', 0, 16)
return {added, now, dead}
