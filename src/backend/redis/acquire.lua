-- Takes a free lock and hands out its fencing token, in one round trip.
--
-- KEYS[1]  the lock key: "<owner> <token>[ <metadata>]"; its expiry is the lease
-- KEYS[2]  the fence counter: the last fencing token handed out for this lock; never expires
-- ARGV[1]  owner token (32 hex digits)
-- ARGV[2]  ttl in milliseconds
-- ARGV[3]  the lock's acquisition channel, where the new token is published for watchers
-- ARGV[4]  restart quarantine in milliseconds; 0 turns it off
-- ARGV[5]  metadata (absent when the holder gave none)
-- KEYS[3]  with a quarantine: when this server first served leasehold since it last lost its
--          data (milliseconds, server clock); never expires
--
-- Returns the fencing token, as a string, when the lock was taken; otherwise the lock key's
-- PTTL, as an integer.

-- Held by someone else: say how long the current lease has left, which bounds how long a
-- waiter may sleep without a release notice (an expiry publishes nothing). -2 means no key.
local pttl = redis.call('PTTL', KEYS[1])
if pttl ~= -2 then
  return pttl
end

-- Free, but a server that lost its data (a restart without persistence) has forgotten the
-- leases it granted, and their holders may not have noticed yet. With a quarantine, grant
-- nothing until that long after the server first served leasehold again: every lease granted
-- before the loss has expired by then. The answer looks like a held key with that much left.
local quarantine = tonumber(ARGV[4])
if quarantine > 0 then
  local now = redis.call('TIME')
  local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  redis.call('SET', KEYS[3], now_ms, 'NX')
  local left = tonumber(redis.call('GET', KEYS[3])) + quarantine - now_ms
  if left > 0 then
    return left
  end
end

-- Free. Advance the counter first: the token goes into the lock key's value.
if redis.call('INCR', KEYS[2]) == 1 then
  -- INCR found no counter: this key was never locked on this server, or the server lost its
  -- data (a restart without persistence, a failover to a replica that had not seen the
  -- counter). Counting from 1 would hand out tokens that fenced resources have already seen.
  -- Seed from the server clock instead: microseconds since the epoch, times 1024, is above
  -- every token issued before, unless the key was taken more than 1024 times per microsecond
  -- since the last seed (or the server's clock went back).
  local now = redis.call('TIME') -- { seconds, microseconds }, as strings
  -- The seed is near 2^61, past the 53 bits a Lua number (a double) holds exactly: build its
  -- decimal digits from two halves that are each exact.
  local scaled_micros = tonumber(now[2]) * 1024 -- under 1024 * 10^6
  local millions = tonumber(now[1]) * 1024 + math.floor(scaled_micros / 1000000)
  redis.call('SET', KEYS[2], string.format('%.0f%06d', millions, scaled_micros % 1000000))
  redis.call('INCR', KEYS[2])
end
-- INCR works on the 64-bit integer inside Redis, so it is exact, but its reply becomes a Lua
-- number, which is not. Read the token back as a string to keep every digit.
local token = redis.call('GET', KEYS[2])

local value = ARGV[1] .. ' ' .. token
if ARGV[5] then
  value = value .. ' ' .. ARGV[5]
end
-- PX is the lease: a holder that dies without releasing frees the key when it expires. NX
-- cannot fail after the PTTL check (a script runs alone), but keeps this write from ever
-- replacing another holder's key.
redis.call('SET', KEYS[1], value, 'NX', 'PX', ARGV[2])
-- For monitors (`leasehold watch` PSUBSCRIBEs to these channels): a PUBLISH nobody listens to
-- costs the server a lookup, not a write.
redis.call('PUBLISH', ARGV[3], token)
return token
