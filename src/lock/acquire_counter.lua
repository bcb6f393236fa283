-- raceguard lock: counter-fenced acquire (Fencing::Counter).
-- KEYS[1]  the lock key            {name} hash tag: one slot with KEYS[2]
-- KEYS[2]  the fencing counter     never expires, never deleted by release
-- ARGV[1]  the owner token (32 hex digits, 128 random bits)
-- ARGV[2]  the TTL in milliseconds
-- Returns the fencing token (> 1) when acquired; otherwise -1 - PTTL of the
-- current holder (PTTL clamped at 0), as acquire.lua does.
--
-- The token is the counter's INCR. An INCR answering 1 found the counter
-- missing (a restart without persistence, an eviction, a flush): the
-- counter is then moved up to the server clock in microseconds before the
-- token is handed out, so it restarts above every token issued before as
-- long as the clock did not go back. Unlike acquire.lua, a counter that
-- exists but went back (a promoted replica that had not seen the last
-- INCRs) is not caught: that costs a TIME call on every acquire.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local fence = redis.call('INCR', KEYS[2])
  if fence == 1 then
    local t = redis.call('TIME')
    fence = t[1] * 1000000 + t[2]
    redis.call('SET', KEYS[2], string.format('%.0f', fence))
  end
  return fence
end
local pttl = redis.call('PTTL', KEYS[1])
if pttl < 0 then
  pttl = 0
end
return -1 - pttl
