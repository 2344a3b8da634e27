-- Gives a read share or the write hold of a read-write lock back and wakes the waiters, in one
-- round trip.
--
-- KEYS[1]  the read shares (sorted set of owner tokens, by expiry in server ms)
-- KEYS[2]  the write hold (string key: the writer's owner token, with the hold's ttl)
-- ARGV[1]  owner token
-- ARGV[2]  "read" or "write"
-- ARGV[3]  the lock's release channel
--
-- Returns 1 when the share or hold was live and is now gone, 0 when it was not live any more.

if ARGV[2] == 'write' then
  if redis.call('GET', KEYS[2]) ~= ARGV[1] then
    return 0
  end
  redis.call('DEL', KEYS[2])
else
  local now = redis.call('TIME')
  now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  local expires = redis.call('ZSCORE', KEYS[1], ARGV[1])
  if not expires then
    return 0
  end
  redis.call('ZREM', KEYS[1], ARGV[1])
  if tonumber(expires) <= now then
    -- It had run out: nobody waits for this.
    return 0
  end
end
-- In the same atomic step as the delete, as for a lock (see release.lua).
redis.call('PUBLISH', ARGV[3], '')
return 1
