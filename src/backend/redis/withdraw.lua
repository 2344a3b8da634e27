-- Takes a candidate out of an election's queue, and wakes the waiters if it was first.
--
-- KEYS[1]  the lock key (the leadership)
-- KEYS[2]  the queue (sorted set of owner tokens)
-- KEYS[3]  the queue entries' leases (hash)
-- ARGV[1]  owner token
-- ARGV[2]  the lock's release channel (the waiters' notice)
--
-- Returns 1 if the candidate was in the queue.

local first = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
local removed = redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
if first == ARGV[1] and redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('PUBLISH', ARGV[2], '')
end
return removed
