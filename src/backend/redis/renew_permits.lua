-- Extends a semaphore lease, if it is still live.
--
-- KEYS[1]  the leases (sorted set of "<owner>:<k>:<N>:<token>", by expiry in server ms)
-- KEYS[2]  the leases' metadata (hash, owner -> metadata)
-- ARGV[1]  the lease's member
-- ARGV[2]  new ttl in milliseconds, from now
--
-- Returns 1 when extended, 0 when the lease is gone (it ran out, or was released).

local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local expires = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expires or tonumber(expires) <= now then
  return 0
end
local until_ms = string.format('%.0f', now + tonumber(ARGV[2]))
redis.call('ZADD', KEYS[1], 'XX', until_ms, ARGV[1])
-- GT: only ever later (the keys always have an expiry, set by the acquisition).
redis.call('PEXPIREAT', KEYS[1], until_ms, 'GT')
redis.call('PEXPIREAT', KEYS[2], until_ms, 'GT')
return 1
