-- Gives a semaphore lease back and wakes the waiters, in one round trip.
--
-- KEYS[1]  the leases (sorted set of "<owner>:<k>:<N>:<token>", by expiry in server ms)
-- KEYS[2]  the leases' metadata (hash, owner -> metadata)
-- ARGV[1]  the lease's member; or only its owner token, for an acquisition whose answer never
--          came (its token is not known): then the member is looked for
-- ARGV[2]  the semaphore's release channel
--
-- Returns 1 when the lease was live and is now gone, 0 when it was not live any more.

local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local member = ARGV[1]
local owner = string.match(member, '^(%x+)')
if member == owner then
  member = nil
  for _, each in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    if string.sub(each, 1, #owner + 1) == owner .. ':' then
      member = each
    end
  end
  if not member then
    return 0
  end
end
local expires = redis.call('ZSCORE', KEYS[1], member)
if not expires then
  return 0
end
redis.call('ZREM', KEYS[1], member)
redis.call('HDEL', KEYS[2], owner)
if tonumber(expires) <= now then
  -- It had run out: its permits were free already, and nobody waits for this.
  return 0
end
-- In the same atomic step as the delete, as for a lock (see release.lua).
redis.call('PUBLISH', ARGV[2], '')
return 1
