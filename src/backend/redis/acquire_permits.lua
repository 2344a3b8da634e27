-- Takes k of a semaphore's N permits as one lease, if that many are free, in one round trip.
--
-- KEYS[1]  the leases: a sorted set of members "<owner>:<k>:<N>:<token>", each scored by when
--          its lease runs out (server milliseconds)
-- KEYS[2]  the leases' metadata: a hash, owner token -> metadata (only leases that have any)
-- KEYS[3]  the fence counter: the last fencing token handed out for this semaphore; never
--          expires
-- ARGV[1]  owner token (32 hex digits)
-- ARGV[2]  ttl in milliseconds
-- ARGV[3]  N, the semaphore's permits
-- ARGV[4]  k, the permits asked for
-- ARGV[5]  the metadata, or "" for none
-- ARGV[6]  restart quarantine in milliseconds; 0 turns it off
-- ARGV[7]  fair acquisitions only: the semaphore's release channel; absent, the queue below
--          is not looked at (an unfair acquisition costs nothing more)
-- KEYS[4]  fair only: the queue, a sorted set of waiting owner tokens scored by arrival
-- KEYS[5]  fair only: the queue entries' leases, a hash owner token -> expiry (server ms)
-- KEYS[6]  fair only: the arrival counter (scores for KEYS[4]); never expires
-- KEYS[#KEYS]  with a quarantine only (last): when this server first served leasehold since
--          it last lost its data (see acquire.lua)
--
-- Returns the fencing token when the permits were taken: an integer, or its decimal digits as
-- a string when it is 2^53 or more. When too few are free: a one-element array, how long the
-- first lease to run out has left (ms). When the live leases were granted with another N: the
-- array { "mismatch", <their N> }. A fair acquisition that must wait: a one-element array, how
-- long to wait before its next attempt (at most half the ttl, so that attempt renews its
-- place in time), as in campaign.lua.
--
-- A free semaphore costs TIME, ZRANGE, INCR, ZADD and PEXPIREAT.

local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
-- A server that lost its data has forgotten the leases it granted, and their holders may not
-- have noticed yet: as in acquire.lua, nothing is granted until the quarantine is over.
local quarantine = tonumber(ARGV[6])
if quarantine > 0 then
  local first = redis.call('SET', KEYS[#KEYS], now, 'NX', 'GET')
  if not first then
    return { quarantine }
  end
  local left = tonumber(first) + quarantine - now
  if left > 0 then
    return { left }
  end
end

local total = tonumber(ARGV[3])
local count = tonumber(ARGV[4])

-- Every lease, soonest to run out first (at most N of them live: N is at most 4096). A lease
-- is a member, not a key, so nothing deletes it at its expiry: the ones that ran out are
-- dropped here, which is what frees a crashed holder's permits.
local leases = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local used, expired, first, last = 0, {}, nil, nil
for i = 1, #leases, 2 do
  local expires = tonumber(leases[i + 1])
  if expires <= now then
    expired[#expired + 1] = leases[i]
  else
    local k, n = string.match(leases[i], '^%x+:(%d+):(%d+):')
    if tonumber(n) ~= total then
      return { 'mismatch', tonumber(n) }
    end
    used = used + tonumber(k)
    first = first or expires
    last = expires
  end
end
if #expired > 0 then
  redis.call('ZREM', KEYS[1], unpack(expired))
  for i, member in ipairs(expired) do
    expired[i] = string.match(member, '^(%x+):')
  end
  redis.call('HDEL', KEYS[2], unpack(expired))
end
local channel = ARGV[7]
if channel then
  -- Fair: admitted only first in the queue (or with nobody in it). A waiter that stopped
  -- trying leaves the queue when its place runs out; entries leave at the head mostly: look
  -- there until a live one.
  local queue, entries = KEYS[4], KEYS[5]
  local owner, ttl = ARGV[1], tonumber(ARGV[2])
  local head
  while true do
    head = redis.call('ZRANGE', queue, 0, 0)[1]
    if not head then break end
    if tonumber(redis.call('HGET', entries, head) or '0') > now then break end
    redis.call('ZREM', queue, head)
    redis.call('HDEL', entries, head)
  end
  local enough = used + count <= total
  if not enough or (head and head ~= owner) then
    -- Wait in line: the place is leased for ttl from this attempt.
    if not redis.call('ZSCORE', queue, owner) then
      redis.call('ZADD', queue, redis.call('INCR', KEYS[6]), owner)
    end
    redis.call('HSET', entries, owner, now + ttl)
    local ahead
    if enough then
      ahead = tonumber(redis.call('HGET', entries, head)) - now
    else
      ahead = (first or now) - now
    end
    return { math.min(ahead, math.floor(ttl / 2)) }
  end
  if head then
    redis.call('ZREM', queue, owner)
    redis.call('HDEL', entries, owner)
    -- Permits are left: the next in line may fit.
    if used + count < total and redis.call('ZCARD', queue) > 0 then
      redis.call('PUBLISH', channel, '')
    end
  end
end
if used + count > total then
  -- Too few free: the first lease to run out may free enough, and an expiry publishes
  -- nothing, so the waiter looks again by then at the latest.
  return { (first or now) - now }
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

local expires = now + tonumber(ARGV[2])
local member = ARGV[1] .. ':' .. ARGV[4] .. ':' .. ARGV[3] .. ':' .. digits
redis.call('ZADD', KEYS[1], string.format('%.0f', expires), member)
-- The set goes when its last lease runs out, so a semaphore nobody uses leaves only its
-- fence counter.
local until_ms = string.format('%.0f', math.max(expires, last or 0))
redis.call('PEXPIREAT', KEYS[1], until_ms)
if ARGV[5] ~= '' then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[5])
  redis.call('PEXPIREAT', KEYS[2], until_ms)
end
return token
