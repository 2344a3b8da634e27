-- The live leases of a semaphore.
--
-- KEYS[1]  the leases (sorted set of "<owner>:<k>:<N>:<token>", by expiry in server ms)
-- KEYS[2]  the leases' metadata (hash, owner -> metadata)
--
-- Returns a flat array: for each live lease, its member, the milliseconds it has left, and
-- its metadata ("" for none).

local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. string.format('%.0f', now), '+inf', 'WITHSCORES')
local out = {}
for i = 1, #live, 2 do
  out[#out + 1] = live[i]
  out[#out + 1] = tonumber(live[i + 1]) - now
  out[#out + 1] = redis.call('HGET', KEYS[2], string.match(live[i], '^(%x+):')) or ''
end
return out
