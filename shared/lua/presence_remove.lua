-- Unregisters one connection of a user on a node; drops the node from the user's hash at zero so
-- lookups never see empty entries.
--
-- KEYS[1]  user presence hash node_id -> connection count
-- ARGV[1]  node id
--
-- Returns the user's remaining connection count on that node.
local left = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if left <= 0 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 0
end
return left
