-- Assigns the next per-user seq, appends the envelope to the user's mailbox and returns where the user
-- is connected: the atomic heart of the delivery model (one script, one slot: the user's hash tag).
--
-- KEYS[1]  user meta hash {seq, epoch, acked}
-- KEYS[2]  user mailbox stream (entry id = "<seq>-0")
-- KEYS[3]  user presence hash node_id -> connection count
-- KEYS[4]  dedup marker of this message for this user (msg id -> seq), used when ARGV[4] > 0
-- ARGV[1]  packed envelope bytes
-- ARGV[2]  mailbox cap (exact MAXLEN: small caps must hold exactly)
-- ARGV[3]  mailbox / meta TTL in seconds
-- ARGV[4]  dedup TTL in seconds; 0: this message is not deduplicated
--
-- Returns {seq, epoch, {node, count, node, count, ...}, mailbox length, entries trimmed by the cap}.
-- A message whose dedup marker exists (a retry of a send that partly or wholly succeeded) is not
-- appended again: the seq it got the first time is returned.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then
  -- The sequence is new or was lost (Redis restarted without persistence, or the TTL passed): start a
  -- new epoch so clients never mistake new messages for ones they have already seen. A mailbox left
  -- without its counter belongs to the old epoch and would collide with the new ids.
  local t = redis.call('TIME')
  epoch = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0, 'acked', 0)
end
local dedup_ttl = tonumber(ARGV[4])
if dedup_ttl > 0 then
  local first = redis.call('GET', KEYS[4])
  if first then
    return {tonumber(first), epoch, redis.call('HGETALL', KEYS[3]), redis.call('XLEN', KEYS[2]), 0}
  end
end
local before = redis.call('XLEN', KEYS[2])
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], seq .. '-0', 'd', ARGV[1])
local length = redis.call('XLEN', KEYS[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
if dedup_ttl > 0 then
  redis.call('SET', KEYS[4], seq, 'EX', dedup_ttl)
end
return {seq, epoch, redis.call('HGETALL', KEYS[3]), length, before + 1 - length}
