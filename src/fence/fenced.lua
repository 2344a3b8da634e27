-- Runs the caller's script body only if the caller's fencing token is not older than the
-- newest token that has written this resource, and records the token. One script, so Redis
-- runs the check, the record and the caller's writes atomically: no other client's command
-- can come between them.
--
-- KEYS[1]   the resource's fence key: the newest token that wrote, as decimal digits
-- KEYS[2..] the caller's keys; KEYS[2] is the resource itself
-- ARGV[1]   the caller's token, as decimal digits without leading zeros
-- ARGV[2..] the caller's arguments
--
-- Returns { 1, <the body's result> } when the body ran, { 0, <newest token> } when the token
-- was older and nothing was written.

-- Tokens are u64; a Lua number is a double, exact only below 2^53, and Redis integers are
-- signed 64-bit, so neither tonumber nor INCRBY-style arithmetic can compare every token.
-- Decimal strings without leading zeros compare exactly: the shorter is smaller, and of equal
-- length the first differing digit decides (compared as bytes, not with `<` on strings,
-- which goes through the server's collation locale).
local function older(a, b)
  if #a ~= #b then
    return #a < #b
  end
  for i = 1, #a do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x < y
    end
  end
  return false
end

local token = ARGV[1]
local newest = redis.call('GET', KEYS[1])
if newest and older(token, newest) then
  return { 0, newest }
end
if newest ~= token then
  redis.call('SET', KEYS[1], token)
end

-- The caller's body sees its own KEYS and ARGV, without the fence's.
local keys, args = {}, {}
for i = 2, #KEYS do
  keys[i - 1] = KEYS[i]
end
for i = 2, #ARGV do
  args[i - 1] = ARGV[i]
end
local result = (function(KEYS, ARGV)
--BODY--
end)(keys, args)
return { 1, result }
