-- Gives a lock back: compare-and-delete, then wake the waiters, in one round trip.
--
-- KEYS[1]  the lock key: "<owner>[ <metadata>]"
-- ARGV[1]  owner token
-- ARGV[2]  the lock's release channel
--
-- Returns 1 when the lock was ours and is now deleted, 0 when it was not ours any more.

-- Only the owner named in the lock key may delete it. A lease that expired may already
-- belong to someone else, whose key must stay.
local value = redis.call('GET', KEYS[1])
if not value or (value ~= ARGV[1] and string.sub(value, 1, #ARGV[1] + 1) ~= ARGV[1] .. ' ') then
  return 0
end
redis.call('DEL', KEYS[1])
-- Waiters on every node SUBSCRIBE to this channel. Publishing from inside the script sends
-- the notice in the same atomic step as the delete: nobody can see the key gone without the
-- notice on its way. Channels are not keys, so it comes as an argument. (The fence counter is
-- left alone: it must outlive the lock, so the next holder's token is greater.)
redis.call('PUBLISH', ARGV[2], '')
return 1
