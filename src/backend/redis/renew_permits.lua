-- Extends a semaphore lease, if it is still ours and has not run out.
--
-- KEYS[1]  the leases (sorted set, owner -> expiry in server ms)
-- KEYS[2]  the leases' records (hash)
-- ARGV[1]  owner token
-- ARGV[2]  new ttl in milliseconds, from now
--
-- Returns 1 when extended, 0 when the lease is gone (it ran out, or was released).

local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local expires = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expires or tonumber(expires) <= now then
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', string.format('%.0f', now + tonumber(ARGV[2])), ARGV[1])
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], last[2])
redis.call('PEXPIREAT', KEYS[2], last[2])
return 1
