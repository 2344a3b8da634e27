-- The live leases of a semaphore.
--
-- KEYS[1]  the leases (sorted set, owner -> expiry in server ms)
-- KEYS[2]  the leases' records (hash)
--
-- Returns a flat array: for each live lease, its record "<k> <N> <token>[ <metadata>]" and
-- the milliseconds it has left.

local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. string.format('%.0f', now), '+inf', 'WITHSCORES')
local out = {}
for i = 1, #live, 2 do
  local record = redis.call('HGET', KEYS[2], live[i])
  if record then
    out[#out + 1] = record
    out[#out + 1] = tonumber(live[i + 1]) - now
  end
end
return out
