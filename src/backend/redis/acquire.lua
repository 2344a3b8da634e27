-- Takes a free lock and hands out its fencing token, in one round trip.
--
-- KEYS[1]  the lock key: "<owner>[ <metadata>]"; its expiry is the lease
-- KEYS[2]  the fence counter: the last fencing token handed out for this lock; never expires.
--          While the lock key exists it is also the holder's token (see below).
-- KEYS[3]  with a quarantine only: when this server first served leasehold since it last lost
--          its data (milliseconds, server clock); never expires
-- ARGV[1]  the lock key's value: owner token (32 hex digits), then a space and the metadata if
--          the holder gave any
-- ARGV[2]  ttl in milliseconds
-- ARGV[3]  restart quarantine in milliseconds; 0 turns it off
-- ARGV[4]  the lock's acquisition channel, where the new token is published for watchers;
--          empty on Redis Cluster, where there are no watchers (no pattern subscriptions)
--
-- Returns the fencing token when the lock was taken: an integer, or its decimal digits as a
-- string when it is 2^53 or more. When the lock is held: a one-element array, the lock key's
-- PTTL.
--
-- A free key costs SET, INCR and PUBLISH; a taken key SET and PTTL.

-- A server that lost its data (a restart without persistence) has forgotten the leases it
-- granted, and their holders may not have noticed yet. With a quarantine, grant nothing until
-- that long after the server first served leasehold again: every lease granted before the loss
-- has expired by then. The answer looks like a held key with that much left.
local quarantine = tonumber(ARGV[3])
if quarantine > 0 then
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  -- NX GET (Redis 7): records the first time, and answers the recorded one, in one command.
  local first = redis.call('SET', KEYS[3], now_ms, 'NX', 'GET')
  if first then
    local left = tonumber(first) + quarantine - now_ms
    if left > 0 then
      return { left }
    end
  else
    -- We recorded it just now: the quarantine starts here.
    return { quarantine }
  end
end

-- PX is the lease: a holder that dies without releasing frees the key when it expires. NX is
-- the lock: it writes only if nobody holds the key.
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  -- Held by someone else: say how long the current lease has left, which bounds how long a
  -- waiter may sleep without a release notice (an expiry publishes nothing).
  return { redis.call('PTTL', KEYS[1]) }
end

-- Ours. Nobody can INCR the counter again while we hold the key (only this script does, and
-- only after its SET NX succeeded), so from now until the key goes the counter IS our token:
-- `inspect` reads it from there.
local token = redis.call('INCR', KEYS[2])
if token == 1 then
  -- INCR found no counter: this key was never locked on this server, or the server lost its
  -- data (a restart without persistence, a failover to a replica that had not seen the
  -- counter). Counting from 1 would hand out tokens that fenced resources have already seen.
  -- Seed from the server clock instead: milliseconds since the epoch, times 1024, is above
  -- every token issued before, unless the key was taken more than 1024 times per millisecond
  -- on average since the last seed (or the server's clock went back). It stays under 2^53, so
  -- a Lua number holds it exactly, until the year 2248.
  local now = redis.call('TIME') -- { seconds, microseconds }, as strings
  local seed = (tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)) * 1024 + 1
  -- %.0f: tostring would print 1.8e+15. The seed is exact (under 2^53, see above).
  redis.call('SET', KEYS[2], string.format('%.0f', seed))
  token = seed
end

-- INCR works on the 64-bit integer inside Redis, so it is exact, but its reply becomes a Lua
-- number, a double, which is exact only below 2^53. Counters seeded by leasehold 0.1 (from
-- microseconds, near 2^61) are above that: read those back as a string to keep every digit.
if token >= 9007199254740992 then
  token = redis.call('GET', KEYS[2])
end

-- For monitors (`leasehold watch` PSUBSCRIBEs to these channels). A PUBLISH nobody listens
-- to costs the server a lookup (measured: about 0.4 us of a 10 us script), and is the only way
-- a watch sees an acquisition in the same atomic step; the module docs say why no cheaper
-- scheme is used. As digits: how Redis turns a Lua number into an argument is not worth
-- relying on.
if ARGV[4] ~= '' then
  redis.call('PUBLISH', ARGV[4], type(token) == 'number' and string.format('%.0f', token) or token)
end
return token
