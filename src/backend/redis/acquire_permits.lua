-- Takes k of a semaphore's N permits as one lease, if that many are free, in one round trip.
--
-- KEYS[1]  the leases: a sorted set of owner tokens, each scored by when its lease runs out
--          (server milliseconds)
-- KEYS[2]  the leases' records: a hash, owner token -> "<k> <N> <token>[ <metadata>]"
-- KEYS[3]  the fence counter: the last fencing token handed out for this semaphore; never
--          expires
-- ARGV[1]  owner token (32 hex digits)
-- ARGV[2]  ttl in milliseconds
-- ARGV[3]  N, the semaphore's permits
-- ARGV[4]  k, the permits asked for
-- ARGV[5]  "" or " <metadata>"
--
-- Returns the fencing token when the permits were taken: an integer, or its decimal digits as
-- a string when it is 2^53 or more. When too few are free: a one-element array, how long the
-- first lease to run out has left (ms). When the live leases were granted with another N: the
-- array { "mismatch", <their N> }.

local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local total = tonumber(ARGV[3])
local count = tonumber(ARGV[4])

-- Nothing deletes a lease at its expiry (it is a member, not a key): the leases that ran out
-- are dropped here, which is what frees a crashed holder's permits.
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
if #expired > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  redis.call('HDEL', KEYS[2], unpack(expired))
end

-- At most N leases' records (N is at most 4096), each saying its k and its N.
local used = 0
for _, lease in ipairs(redis.call('HVALS', KEYS[2])) do
  local k, n = string.match(lease, '^(%d+) (%d+) ')
  if tonumber(n) ~= total then
    return { 'mismatch', tonumber(n) }
  end
  used = used + tonumber(k)
end
if used + count > total then
  -- Too few free: the first lease to run out may free enough, and an expiry publishes
  -- nothing, so the waiter looks again by then at the latest.
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return { math.max(tonumber(first[2]) - now, 0) }
end

-- Granted. The token as in acquire.lua: seeded from the clock if the counter was missing.
local token = redis.call('INCR', KEYS[3])
if token == 1 then
  local seed = now * 1024 + 1
  redis.call('SET', KEYS[3], string.format('%.0f', seed))
  token = seed
end
if token >= 9007199254740992 then
  token = redis.call('GET', KEYS[3])
end
local digits = type(token) == 'number' and string.format('%.0f', token) or token

redis.call('ZADD', KEYS[1], string.format('%.0f', now + tonumber(ARGV[2])), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4] .. ' ' .. ARGV[3] .. ' ' .. digits .. ARGV[5])
-- Both keys go when the last lease runs out, so a semaphore nobody uses leaves nothing.
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], last[2])
redis.call('PEXPIREAT', KEYS[2], last[2])
return token
