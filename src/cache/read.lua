-- Versioned cache read: one round trip on a hit.
-- KEYS[1]  the scope's version key
-- ARGV[1]  value key prefix (up to and including ":v")
-- ARGV[2]  value key suffix (":" .. escaped item)
-- Returns {version, value-or-false}. A missing version key is created with
-- a fresh number (server time in microseconds), never reusing an old one
-- unless the server clock went back.
local v = redis.call('GET', KEYS[1])
if not v then
  local t = redis.call('TIME')
  v = t[1] .. string.format('%06d', tonumber(t[2]))
  redis.call('SET', KEYS[1], v)
end
local value = redis.call('GET', ARGV[1] .. v .. ARGV[2])
return {v, value}
