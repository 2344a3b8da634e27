-- SET the resource's value only if the caller's fencing token is not older than the newest
-- token that has written it, and record the token: `fenced.lua` with the body inlined,
-- because a plain SET is the write most callers fence and the wrapper's function call and
-- KEYS/ARGV copies cost the server more than the SET itself.
--
-- KEYS[1]  the resource's fence key: the newest token that wrote, as decimal digits
-- KEYS[2]  the resource
-- ARGV[1]  the caller's token, as decimal digits without leading zeros
-- ARGV[2]  the value
--
-- Returns 1 when the value was written, the newest token (a string) when the caller's token
-- was older and nothing was written.

-- Exact u64 comparison of decimal strings: see `fenced.lua`.
local token, newest = ARGV[1], redis.call('GET', KEYS[1])
if newest and newest ~= token then
  local older = #token < #newest
  if #token == #newest then
    for i = 1, #token do
      local x, y = string.byte(token, i), string.byte(newest, i)
      if x ~= y then
        older = x < y
        break
      end
    end
  end
  if older then
    return newest
  end
end
if newest ~= token then
  redis.call('SET', KEYS[1], token)
end
redis.call('SET', KEYS[2], ARGV[2])
return 1
