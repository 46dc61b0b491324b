-- One heartbeat of a gateway node: moves its deadline forward in the node registry, on Redis's clock so
-- that node and router clocks never need to agree.
--
-- KEYS[1]  node registry sorted set node_id -> deadline (unix ms, Redis time)
-- ARGV[1]  node id
-- ARGV[2]  milliseconds until the node counts as dead (2 heartbeat intervals)
--
-- Returns {lapse, now_ms, dead node ids (deadline passed) ...} where lapse is 0 when the node was
-- live, 1 when it was not registered (first beat, Redis lost it, or a peer reaped it) and 2 when its
-- deadline had passed (it stalled): in both last cases senders treated it as dead for a while.
-- A node is dead from its deadline on (live means deadline > now, as in mailbox_append.lua and
-- shared.nodes.RegistryView), so a beat in the very millisecond a reader declared it dead reports it.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local previous = redis.call('ZSCORE', KEYS[1], ARGV[1])
local lapse = 0
if not previous then
  lapse = 1
elseif tonumber(previous) <= now then
  lapse = 2
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 16)
return {lapse, now, dead}
