-- Versioned cache invalidation: one atomic version bump for one scope.
-- KEYS[1]  the scope's version key
-- Returns the new version. A missing version key starts from the server
-- time in microseconds (see read.lua), then is incremented.
if redis.call('EXISTS', KEYS[1]) == 0 then
  local t = redis.call('TIME')
  redis.call('SET', KEYS[1], t[1] .. string.format('%06d', tonumber(t[2])))
end
return redis.call('INCR', KEYS[1])
