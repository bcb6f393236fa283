-- raceguard GCRA on Redis: a line-by-line port of `src/rate/gcra.rs`
-- (`decide` and `check_all`), so one semantics runs on two backends; a
-- differential test feeds both the same inputs and compares every decision.
--
-- KEYS[i]   the cell (theoretical arrival time, decimal nanoseconds) of
--           request i. A key may repeat: a later request sees the earlier
--           ones' consumption, exactly as check_all does.
-- ARGV[1]   mode: "c" to consume (check) or "p" to decide only (peek),
--           followed by nothing -> now = the server's TIME (app-server clock
--                  skew cannot widen a limit; keys expire after their reset
--                  time)
--           or by N -> now = N nanoseconds (explicit-time mode, for tests
--                  and callers with their own clock; keys do not expire)
-- ARGV[3i-1], ARGV[3i], ARGV[3i+1]  interval_ns, burst, cost of request i
--
-- Returns, for one request, one integer: `after` (>= 0) when allowed, or
-- -(retry_after + 1) when denied (the caller derives the backlog from its
-- own quota and cost); for several requests the array
-- { all_allowed, allowed_1, backlog_1, retry_1, allowed_2, ... }.
-- All-or-nothing: when any request is denied nothing is written.
--
-- Numbers: Lua 5.1 numbers are doubles, exact for integers below 2^53.
-- Times (~1.7e18 ns) are not, so they are split into seconds and
-- nanoseconds and only differences are formed; quotas are validated so that
-- interval * burst <= 2^53.

local E9 = 1000000000
local MAX_DS = 9007199 -- seconds: MAX_DS * E9 < 2^53
local tonumber, sub, format, floor = tonumber, string.sub, string.format, math.floor
local call = redis.call

-- "1795000000123456789" -> 1795000000, 123456789 (exact: each part < 2^53)
local function split(s)
  local n = #s
  if n <= 9 then
    return 0, tonumber(s)
  end
  return tonumber(sub(s, 1, n - 9)), tonumber(sub(s, n - 8))
end

local function join(sec, ns)
  if sec == 0 then
    return format('%d', ns)
  end
  return format('%d%09d', sec, ns)
end

local mode = ARGV[1]
local explicit = #mode > 1
local now_s, now_ns
if explicit then
  now_s, now_ns = split(sub(mode, 2))
else
  local t = call('TIME')
  now_s = tonumber(t[1])
  now_ns = tonumber(t[2]) * 1000
end
local write = sub(mode, 1, 1) == 'c'

-- backlog = max(tat - now, 0), exactly, from the split parts.
local function backlog_of(s, ns)
  local ds = s - now_s
  if ds < 0 or (ds == 0 and ns <= now_ns) then
    return 0
  elseif ds > MAX_DS then
    return MAX_DS * E9 -- the clock went back by months: deny, capped
  end
  return ds * E9 + (ns - now_ns)
end

-- tat = now + after, carried in seconds and nanoseconds.
local function advance(after)
  local q = floor(after / E9)
  local r = after - q * E9
  if r < 0 then q = q - 1; r = r + E9 elseif r >= E9 then q = q + 1; r = r - E9 end
  local ns = now_ns + r
  local s = now_s + q
  if ns >= E9 then s = s + 1; ns = ns - E9 end
  return s, ns
end

local function store(key, s, ns, reset)
  if explicit then
    call('SET', key, join(s, ns))
  else
    -- Expire when the cell is full again: an absent key decides exactly
    -- like an idle one, so idle users cost nothing.
    call('SET', key, join(s, ns), 'PX', floor(reset / 1000000) + 1)
  end
end

if #KEYS == 1 then
  -- The common case, one limit: no per-key tables.
  local key = KEYS[1]
  local interval = tonumber(ARGV[2])
  local window = interval * tonumber(ARGV[3])
  local cost = tonumber(ARGV[4])
  local v = call('GET', key)
  local backlog = 0
  if v then
    backlog = backlog_of(split(v))
  end
  local after = backlog + cost * interval
  if after <= window then
    if write and cost > 0 then
      local s, ns = advance(after)
      store(key, s, ns, after)
    end
    return after
  end
  return window - after - 1 -- = -(retry_after + 1)
end

-- Several limits, all or nothing (check_all).
local cells = {}
local out = { 1 }
local touched = {}
for i = 1, #KEYS do
  local key = KEYS[i]
  local base = 3 * i - 1
  local interval = tonumber(ARGV[base])
  local window = interval * tonumber(ARGV[base + 1])
  local cost = tonumber(ARGV[base + 2])
  local c = cells[key]
  if c == nil then
    local v = call('GET', key)
    if v then
      local s, ns = split(v)
      c = { s, ns }
    else
      c = { 0, 0 }
    end
    cells[key] = c
  end
  local backlog = backlog_of(c[1], c[2])
  local after = backlog + cost * interval
  if after <= window then
    if cost > 0 then
      c[1], c[2] = advance(after)
      touched[key] = after
    end
    out[#out + 1] = 1
    out[#out + 1] = after
    out[#out + 1] = 0
  else
    out[1] = 0
    out[#out + 1] = 0
    out[#out + 1] = backlog
    out[#out + 1] = after - window
  end
end

if out[1] == 1 and write then
  for key, reset in pairs(touched) do
    local c = cells[key]
    store(key, c[1], c[2], reset)
  end
end

return out
