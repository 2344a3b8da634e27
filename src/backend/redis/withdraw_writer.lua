-- Takes a waiting writer's intent off a read-write lock (the writer stopped waiting), and wakes
-- the waiters: readers it held back may get in now.
--
-- KEYS[1]  the waiting writers' intents (sorted set of owner tokens, by expiry in server ms)
-- ARGV[1]  the writer's owner token
-- ARGV[2]  the lock's release channel
--
-- Returns 1 when an intent was withdrawn, 0 when there was none.

if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('PUBLISH', ARGV[2], '')
return 1
