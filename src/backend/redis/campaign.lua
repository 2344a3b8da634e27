-- One attempt of a candidate to lead an election (or of a fair lock's waiter to take the lock),
-- in one round trip: take the lock key if nobody holds it and the candidate is first in the
-- queue, else keep (or take) its place there.
--
-- KEYS[1]  the lock key (the leadership): ARGV[6]; its expiry is the lease
-- KEYS[2]  the fence counter: the last term handed out; never expires
-- KEYS[3]  the queue: a sorted set of candidate owner tokens, scored by arrival
-- KEYS[4]  the queue entries' leases: a hash, owner token -> expiry (server ms)
-- KEYS[5]  the arrival counter (scores for KEYS[3]); never expires
-- ARGV[1]  owner token (32 hex digits)
-- ARGV[2]  the candidate's value
-- ARGV[3]  ttl in milliseconds (the leadership's, and the queue entry's)
-- KEYS[6]  with a quarantine only: when this server first served leasehold since it last lost
--          its data (see acquire.lua)
-- ARGV[4]  the election's leader channel: "<term> <value>" on each new leader or value; empty
--          for a fair lock (no observers)
-- ARGV[5]  the lock's acquisition channel (for `watch`); empty: publish nothing
-- ARGV[6]  the lock key's value: "<owner> <value>" for an election, "<owner>[ <metadata>]" for
--          a fair lock
-- ARGV[7]  restart quarantine in milliseconds (see acquire.lua); 0 or absent turns it off
--
-- Returns the term (fencing token) when elected: an integer, or its digits as a string at
-- 2^53 or more. Otherwise a one-element array: how long to wait before the next attempt, in
-- ms (until whoever is ahead may be gone, and at most half the entry's ttl, so the next
-- attempt renews the entry in time).

local owner, ttl = ARGV[1], tonumber(ARGV[3])
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)

-- A candidate that stopped trying leaves the queue when its entry's lease runs out. Entries
-- leave at the head mostly: look there until a live one.
while true do
  local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
  if not head then break end
  local expires = tonumber(redis.call('HGET', KEYS[4], head) or '0')
  if expires > now_ms then break end
  redis.call('ZREM', KEYS[3], head)
  redis.call('HDEL', KEYS[4], head)
end
local first = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
local pttl = redis.call('PTTL', KEYS[1])

-- A server that lost its data grants nothing until every lease it granted before has
-- expired, exactly as in acquire.lua; meanwhile the candidate waits in line as for a held key.
local quarantine = tonumber(ARGV[7] or '0')
if quarantine > 0 and pttl == -2 then
  local recorded = redis.call('SET', KEYS[6], now_ms, 'NX', 'GET')
  local left = recorded and (tonumber(recorded) + quarantine - now_ms) or quarantine
  if left > 0 then
    pttl = left
  end
end

if pttl == -2 and (not first or first == owner) then
  redis.call('SET', KEYS[1], ARGV[6], 'PX', ttl)
  redis.call('ZREM', KEYS[3], owner)
  redis.call('HDEL', KEYS[4], owner)
  -- The term: the fence counter, seeded from the server clock when missing, exactly as in
  -- acquire.lua (see there and the module documentation, "Fencing tokens").
  local token = redis.call('INCR', KEYS[2])
  if token == 1 then
    local seed = now_ms * 1024 + 1
    redis.call('SET', KEYS[2], string.format('%.0f', seed))
    token = seed
  end
  if token >= 9007199254740992 then
    token = redis.call('GET', KEYS[2])
  end
  local digits = type(token) == 'number' and string.format('%.0f', token) or token
  if ARGV[5] ~= '' then
    redis.call('PUBLISH', ARGV[5], digits)
  end
  if ARGV[4] ~= '' then
    redis.call('PUBLISH', ARGV[4], digits .. ' ' .. ARGV[2])
  end
  return token
end

-- Wait in line: the entry is leased for ttl from this attempt.
if not redis.call('ZSCORE', KEYS[3], owner) then
  redis.call('ZADD', KEYS[3], redis.call('INCR', KEYS[5]), owner)
end
redis.call('HSET', KEYS[4], owner, now_ms + ttl)
local ahead
if pttl >= 0 then
  ahead = pttl
elseif first and first ~= owner then
  ahead = tonumber(redis.call('HGET', KEYS[4], first)) - now_ms
else
  -- Leaderless and first, but the lock key has no expiry (another client wrote it): retry.
  ahead = 0
end
return { math.min(ahead, math.floor(ttl / 2)) }
