-- Gives a semaphore lease back and wakes the waiters, in one round trip.
--
-- KEYS[1]  the leases (sorted set, owner -> expiry in server ms)
-- KEYS[2]  the leases' records (hash)
-- ARGV[1]  owner token
-- ARGV[2]  the semaphore's release channel
--
-- Returns 1 when the lease was live and is now gone, 0 when it was not live any more.

local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local expires = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expires then
  return 0
end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
if tonumber(expires) <= now then
  -- It had run out: its permits were free already, and nobody waits for this.
  return 0
end
-- In the same atomic step as the delete, as for a lock (see release.lua).
redis.call('PUBLISH', ARGV[2], '')
return 1
