-- Takes a fair waiter out of a semaphore's queue, and wakes the waiters if it was first.
--
-- KEYS[1]  the queue (sorted set of owner tokens)
-- KEYS[2]  the queue entries' leases (hash)
-- ARGV[1]  owner token
-- ARGV[2]  the semaphore's release channel (the waiters' notice)
--
-- Returns 1 if the waiter was in the queue.

local first = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if first == ARGV[1] then
  redis.call('PUBLISH', ARGV[2], '')
end
return removed
