-- Takes a fair waiter out of a read-write lock's queue (it stopped waiting), with a writer's
-- intent, and wakes the waiters if that may let someone in: it was first (a writer behind it
-- may be first now), or a writer (readers behind it, and unfair readers, may go in).
--
-- KEYS[1]  the fair waiters' queue (sorted set of owner tokens, by arrival)
-- KEYS[2]  the places' leases (hash owner token -> expiry in server ms)
-- KEYS[3]  the waiting writers' intents (sorted set of owner tokens, by expiry)
-- ARGV[1]  the waiter's owner token
-- ARGV[2]  the lock's release channel
--
-- Returns 1 if the waiter was in the queue.

local first = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
local writer = redis.call('ZREM', KEYS[3], ARGV[1])
if first == ARGV[1] or writer == 1 then
  redis.call('PUBLISH', ARGV[2], '')
end
return removed
