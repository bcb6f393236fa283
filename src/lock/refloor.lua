-- raceguard lock: the second step of a counter-fenced acquire whose INCR
-- found the counter missing (it answered 1: a restart without persistence,
-- an eviction, a flush). Moves the counter up to the server clock in µs and
-- takes the token from it, only while this owner still holds the lock.
-- KEYS[1]  the lock key            {name} hash tag: one slot with KEYS[2]
-- KEYS[2]  the fencing counter
-- ARGV[1]  the owner token
-- Returns the fencing token (> 1), or 0 when the lock is no longer this
-- owner's (its lease ended in between): then nothing was written.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local fence = redis.call('INCR', KEYS[2])
local t = redis.call('TIME')
local now = t[1] * 1000000 + t[2]
if fence < now then
  fence = now
  redis.call('SET', KEYS[2], string.format('%.0f', now))
end
return fence
