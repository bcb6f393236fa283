-- raceguard lock: fenced acquire.
-- KEYS[1]  the lock key            {name} hash tag: one slot with KEYS[2]
-- KEYS[2]  the fencing counter     never expires, never deleted by release
-- ARGV[1]  the owner token (32 hex digits, 128 random bits)
-- ARGV[2]  the TTL in milliseconds
-- Returns the fencing token (> 0) when acquired; otherwise -1 - PTTL of the
-- current holder (PTTL clamped at 0), so the caller sleeps no longer than
-- the holder's lease.
--
-- The token is the counter's INCR, strictly increasing on this server. When
-- the counter trails the server clock (in microseconds) by more than 65,536
-- (about 65 ms), it is first moved up to the clock: a counter lost in a
-- restart without persistence, or behind on a promoted replica, restarts
-- above every token issued before, as long as the outage outlasted that
-- margin and the clocks agree to within it (see docs/GUARANTEES.md). The
-- move is one write per counter per ~65 ms at most.
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local fence = redis.call('INCR', KEYS[2])
  local t = redis.call('TIME')
  -- Lua's arithmetic converts the two decimal strings exactly as
  -- tonumber() would; skipping the two calls saves ~5% of this script's
  -- server instructions (callgrind on redis-server 7.0).
  local now = t[1] * 1000000 + t[2]
  if fence + 65536 < now then
    fence = now
    redis.call('SET', KEYS[2], string.format('%.0f', now))
  end
  return fence
end
local pttl = redis.call('PTTL', KEYS[1])
if pttl < 0 then
  pttl = 0
end
return -1 - pttl
