-- Extends a read share or the write hold of a read-write lock, if it is still live.
--
-- KEYS[1]  the read shares (sorted set of owner tokens, by expiry in server ms)
-- KEYS[2]  the write hold (string key: the writer's owner token, with the hold's ttl)
-- ARGV[1]  owner token
-- ARGV[2]  new ttl in milliseconds, from now
-- ARGV[3]  "read" or "write"
--
-- Returns 1 when extended, 0 when the share or hold is gone (it ran out, or was released).

local ttl = tonumber(ARGV[2])
if ARGV[3] == 'write' then
  if redis.call('GET', KEYS[2]) ~= ARGV[1] then
    return 0
  end
  redis.call('PEXPIRE', KEYS[2], ttl)
  return 1
end
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local expires = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not expires or tonumber(expires) <= now then
  return 0
end
redis.call('ZADD', KEYS[1], 'XX', string.format('%.0f', now + ttl), ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
