-- Replaces the leader's value, in the same term, if the leadership is still ours.
--
-- KEYS[1]  the lock key (the leadership): "<owner> <value>"
-- KEYS[2]  the fence counter: while the lock key exists, the leader's term
-- ARGV[1]  owner token
-- ARGV[2]  the new value
-- ARGV[3]  the election's leader channel
--
-- Returns 1 when replaced, 0 when the leadership is not ours any more.

local value = redis.call('GET', KEYS[1])
if not value or (value ~= ARGV[1] and string.sub(value, 1, #ARGV[1] + 1) ~= ARGV[1] .. ' ') then
  return 0
end
-- KEEPTTL (Redis 6): the lease goes on as it was.
redis.call('SET', KEYS[1], ARGV[1] .. ' ' .. ARGV[2], 'KEEPTTL')
redis.call('PUBLISH', ARGV[3], redis.call('GET', KEYS[2]) .. ' ' .. ARGV[2])
return 1
