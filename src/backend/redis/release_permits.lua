-- Gives a semaphore lease back and wakes the waiters, in one round trip.
--
-- KEYS[1]  the leases (sorted set of "<owner>:<k>:<N>:<token>", by expiry in server ms)
-- KEYS[2]  the leases' metadata (hash, owner -> metadata)
-- ARGV[1]  the lease's member; or only its owner token, for an acquisition whose answer never
--          came (its token is not known): then the member is looked for
-- ARGV[2]  the semaphore's release channel
--
-- Returns 1 when the lease was in the set and is now gone, 0 when it was not there any more.
--
-- A member whose expiry has passed but is still in the set counts as there: every admission
-- drops the members whose expiry passed before it counts the permits in use, so while the
-- member is still in the set nobody has been granted its permits. (Its holder's own deadline,
-- counted from before the acquisition was sent, passed before the server's expiry did.) So a
-- release needs neither the server's clock nor the member's score: ZREM alone says.

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
if redis.call('ZREM', KEYS[1], member) == 0 then
  return 0
end
redis.call('HDEL', KEYS[2], owner)
-- In the same atomic step as the delete, as for a lock (see release.lua).
redis.call('PUBLISH', ARGV[2], '')
return 1
