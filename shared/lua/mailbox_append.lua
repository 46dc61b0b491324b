-- Assigns the next per-user seq, appends the envelope to the user's mailbox and returns where the user
-- is connected: the atomic heart of the delivery model (one script, one slot: the user's hash tag).
-- On one standalone Redis it can also push the message to the user's live nodes in the same call, which
-- saves the sender a second, dependent round trip. Which nodes is known only here (from the presence
-- hash), so their streams cannot be declared keys: that mode is never used on a Redis Cluster.
--
-- KEYS[1]  user meta hash {seq, epoch, acked}
-- KEYS[2]  user mailbox stream (entry id = "<seq>-0")
-- KEYS[3]  user presence hash node_id -> connection count
-- KEYS[4]  dedup marker of this message for this user (msg id -> seq), used when ARGV[4] > 0
-- KEYS[5]  node registry sorted set node_id -> deadline (Redis ms); given: push to the live nodes
-- ARGV[1]  packed envelope bytes
-- ARGV[2]  mailbox cap (exact MAXLEN: small caps must hold exactly)
-- ARGV[3]  mailbox / meta TTL in seconds
-- ARGV[4]  dedup TTL in seconds; 0: this message is not deduplicated
-- With KEYS[5] only:
-- ARGV[5]  the user id (the pushed entry names its receiver)
-- ARGV[6]  node stream cap (approximate MAXLEN)
-- ARGV[7]  node stream key before the node id, ARGV[8] after it (from shared.keys)
-- ARGV[9]  the sender's own node, not pushed to (it hands its receivers over in-process); "" if none
--
-- Returns {seq, epoch, {node, count, ...}, mailbox length, entries trimmed by the cap}, and with KEYS[5]
-- a sixth item {node, 1|0, ...}: one pair per live node of the user's (the sender's own excepted), 1
-- when the entry was added, 0 when the node's stream no longer exists (NOMKSTREAM never recreates it).
-- A message whose dedup marker exists (a retry of a send that partly or wholly succeeded) is not
-- appended again: the seq it got the first time is returned, and it is pushed again (a retry must
-- complete a push that failed; the gateway drops a seq it has already delivered).
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
local first = dedup_ttl > 0 and redis.call('GET', KEYS[4])
local seq, length, trimmed
if first then
  seq, length, trimmed = tonumber(first), redis.call('XLEN', KEYS[2]), 0
else
  local before = redis.call('XLEN', KEYS[2])
  seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
  redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], seq .. '-0', 'd', ARGV[1])
  length = redis.call('XLEN', KEYS[2])
  trimmed = before + 1 - length
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[3])
  if dedup_ttl > 0 then
    redis.call('SET', KEYS[4], seq, 'EX', dedup_ttl)
  end
end
local presence = redis.call('HGETALL', KEYS[3])

-- The node-stream entry, byte for byte what shared.envelope.StreamEntry.pack makes for one recipient:
-- the msgpack map {v: 1, e: <envelope as bin>, r: [[user, seq, epoch]]}. cmsgpack would pack the
-- envelope as str, so its bin header is written here.
local function stream_entry()
  local n = #ARGV[1]
  local bin
  if n < 256 then
    bin = string.char(0xc4, n)
  elseif n < 65536 then
    bin = string.char(0xc5, math.floor(n / 256), n % 256)
  else
    bin = string.char(0xc6, math.floor(n / 16777216), math.floor(n / 65536) % 256, math.floor(n / 256) % 256, n % 256)
  end
  return string.char(0x83) .. cmsgpack.pack('v') .. cmsgpack.pack(1) .. cmsgpack.pack('e') .. bin .. ARGV[1]
    .. cmsgpack.pack('r') .. cmsgpack.pack({{ARGV[5], seq, epoch}})
end

if #KEYS == 4 then
  return {seq, epoch, presence, length, trimmed}
end
-- Live: the node's deadline, on Redis's clock, has not passed (as shared.nodes.RegistryView judges).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local pushes = {}
local entry
for i = 1, #presence, 2 do
  local node = presence[i]
  local deadline = node ~= ARGV[9] and redis.call('ZSCORE', KEYS[5], node)
  if deadline and tonumber(deadline) > now then
    entry = entry or stream_entry()
    local id = redis.call('XADD', ARGV[7] .. node .. ARGV[8], 'NOMKSTREAM', 'MAXLEN', '~', ARGV[6], '*', 'd', entry)
    pushes[#pushes + 1] = node
    pushes[#pushes + 1] = id and 1 or 0
  end
end
return {seq, epoch, presence, length, trimmed, pushes}
