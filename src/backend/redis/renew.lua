-- Extends a lease, if it is still ours.
--
-- KEYS[1]  the lock key: "<owner>[ <metadata>]"
-- ARGV[1]  owner token
-- ARGV[2]  new ttl in milliseconds, from now
--
-- Returns 1 when extended, 0 when the lock is not ours any more (it expired, or another
-- client deleted or overwrote it): the holder has lost it.

local value = redis.call('GET', KEYS[1])
if not value or (value ~= ARGV[1] and string.sub(value, 1, #ARGV[1] + 1) ~= ARGV[1] .. ' ') then
  return 0
end
-- PEXPIRE restarts the lease from now.
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
