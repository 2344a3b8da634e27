-- One attempt at a read share or the write hold of a read-write lock, in one round trip.
--
-- KEYS[1]  the read shares: a sorted set of owner tokens, each scored by when its share runs
--          out (server milliseconds)
-- KEYS[2]  the write hold: a string key, the writer's owner token, with the hold's ttl
-- KEYS[3]  the waiting writers' intents: a sorted set of owner tokens, each scored by when
--          its intent runs out (server milliseconds)
-- KEYS[4]  the fence counter: the last fencing token handed out for this lock; never expires
-- ARGV[1]  owner token (32 hex digits)
-- ARGV[2]  ttl in milliseconds (of the share, the hold, or a refused writer's intent)
-- ARGV[3]  "read" or "write"
-- ARGV[4]  "1": a refused writer records its intent (it waits); "0": it does not (it tried once)
-- ARGV[5]  restart quarantine in milliseconds; 0 turns it off
-- ARGV[6]  "fair" for a fair waiter (ARGV[4] is then not looked at); absent, the fair queue
--          below is not looked at (an unfair acquisition costs nothing more)
-- KEYS[5]  fair only: the fair waiters' queue, a sorted set of owner tokens scored by arrival
-- KEYS[6]  fair only: the places' leases, a hash owner token -> expiry (server ms)
-- KEYS[7]  fair only: the arrival counter (scores for KEYS[5]); never expires
-- KEYS[#KEYS]  with a quarantine only (last): when this server first served leasehold since
--          it last lost its data (see acquire.lua)
--
-- Returns the fencing token when granted: an integer, or its decimal digits as a string when
-- it is 2^53 or more. When refused: a one-element array, how long until the caller should
-- look again at the latest (ms): when the first lease (or intent) in its way runs out, and for
-- a writer that records its intent at most half the intent's ttl, so it refreshes the intent
-- in time.
--
-- A reader gets in while no writer holds and no intent is live; a writer while nothing at all
-- is held. Every grant takes the next number of one counter, so a writer's token is greater
-- than every token handed out before it.
--
-- Fair: a waiter keeps one place in the queue, leased for its ttl from its latest attempt; a
-- fair writer's owner is in the intents' set too, with the same expiry, so its place keeps new
-- unfair readers out exactly as an unfair writer's intent does. A fair reader gets in while no
-- writer holds and no intent is live that is an unfair writer's (no place) or a fair writer's
-- place ahead of its own (readers ahead do not keep it out); a fair writer while nothing is
-- held and its place is first (or the queue is empty). Admission takes the place (and the
-- writer's intent) out. That lets nobody else in, so it publishes nothing: whatever let this
-- waiter in (a release, a withdrawal) woke the others too.

local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
-- As in acquire.lua: a server that lost its data grants nothing until the quarantine is over.
local quarantine = tonumber(ARGV[5])
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

local owner = ARGV[1]
local ttl = tonumber(ARGV[2])

-- Shares and intents are members, not keys, so nothing deletes them at their expiry: the ones
-- that ran out are dropped here, which is what frees a crashed reader's share, and a dead
-- waiting writer's hold on new readers.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)

-- The set's key lives as long as its longest member.
local function keep(key, expires)
  local left = redis.call('PTTL', key)
  if left < expires - now then
    redis.call('PEXPIREAT', key, string.format('%.0f', expires))
  end
end

-- How long the first of `set`'s members has left, or nil for an empty set.
local function first_left(set)
  local first = redis.call('ZRANGE', set, 0, 0, 'WITHSCORES')
  if first[2] then
    return tonumber(first[2]) - now
  end
  return nil
end

local blocked = redis.call('PTTL', KEYS[2])
if blocked == -1 then
  blocked = ttl -- a hold without an expiry is never written; look again within a ttl anyway
elseif blocked < 0 then
  blocked = nil
end
local function also(left)
  if left and (not blocked or left < blocked) then
    blocked = left
  end
end

if ARGV[6] == 'fair' then
  local queue, places = KEYS[5], KEYS[6]
  -- A waiter that stopped trying leaves the queue when its place runs out; places leave at the
  -- head mostly: look there until a live one.
  local head
  while true do
    head = redis.call('ZRANGE', queue, 0, 0)[1]
    if not head then break end
    if tonumber(redis.call('HGET', places, head) or '0') > now then break end
    redis.call('ZREM', queue, head)
    redis.call('HDEL', places, head)
  end
  local mine = redis.call('ZSCORE', queue, owner)
  if ARGV[3] == 'read' then
    local intents = redis.call('ZRANGE', KEYS[3], 0, -1, 'WITHSCORES')
    for i = 1, #intents, 2 do
      local at = redis.call('ZSCORE', queue, intents[i])
      if not at or not mine or tonumber(at) < tonumber(mine) then
        also(tonumber(intents[i + 1]) - now)
      end
    end
  else
    also(first_left(KEYS[1]))
    if head and head ~= owner then
      also(tonumber(redis.call('HGET', places, head)) - now)
    end
  end
  if blocked then
    -- Wait in line: the place (and a writer's intent) is leased for ttl from this attempt.
    if not mine then
      redis.call('ZADD', queue, redis.call('INCR', KEYS[7]), owner)
    end
    redis.call('HSET', places, owner, string.format('%.0f', now + ttl))
    keep(queue, now + ttl)
    keep(places, now + ttl)
    if ARGV[3] == 'write' then
      redis.call('ZADD', KEYS[3], string.format('%.0f', now + ttl), owner)
      keep(KEYS[3], now + ttl)
    end
    also(math.floor(ttl / 2))
    return { blocked }
  end
  redis.call('ZREM', queue, owner)
  redis.call('HDEL', places, owner)
  redis.call('ZREM', KEYS[3], owner)
elseif ARGV[3] == 'read' then
  also(first_left(KEYS[3]))
  if blocked then
    return { blocked }
  end
else
  also(first_left(KEYS[1]))
  if blocked then
    if ARGV[4] == '1' then
      redis.call('ZADD', KEYS[3], string.format('%.0f', now + ttl), owner)
      keep(KEYS[3], now + ttl)
      also(math.floor(ttl / 2))
    end
    return { blocked }
  end
  redis.call('ZREM', KEYS[3], owner)
end

-- Granted. The token as in acquire.lua: seeded from the clock if the counter was missing.
local token = redis.call('INCR', KEYS[4])
if token == 1 then
  local seed = now * 1024 + 1
  redis.call('SET', KEYS[4], string.format('%.0f', seed))
  token = seed
end
if token >= 9007199254740992 then
  token = redis.call('GET', KEYS[4])
end

if ARGV[3] == 'read' then
  redis.call('ZADD', KEYS[1], string.format('%.0f', now + ttl), owner)
  keep(KEYS[1], now + ttl)
else
  redis.call('SET', KEYS[2], owner, 'PX', ttl)
end
return token
