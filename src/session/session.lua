-- raceguard session registry: one record per session, keyed by the SHA-256
-- of the session id (the id itself is never stored).
--
-- KEYS[1]   the record: a hash with
--             o  owner digest (hex SHA-256 of the user id)
--             g  the owner's generation when the session was created
--             c  created (ms)
--             l  last used (ms)
-- ARGV[1]   op: "create" | "check" | "take" | "revoke"
-- ARGV[2]   now in ms, or "" for the server's TIME
-- ARGV[3]   owner digest of the caller
-- ARGV[4]   the owner's current generation (decimal string)
-- ARGV[5]   idle timeout (ms)
-- ARGV[6]   absolute timeout (ms)
-- ARGV[7]   create only: created time to keep (rotation), or ""
--
-- Replies: create -> 1 created, 0 the id is taken.
--          check / take / revoke -> {status, created}
--            status 0 unknown, 1 expired, 2 not owned, 3 alive
--          check refreshes "last used"; take and revoke delete an alive,
--          owned record.
local call = redis.call
local op = ARGV[1]
local now
if ARGV[2] == "" then
  local t = call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[2])
end
local owner = ARGV[3]
local gen = ARGV[4]
local idle = tonumber(ARGV[5])
local absolute = tonumber(ARGV[6])

local function ttl(created)
  local left = math.min(idle, created + absolute - now)
  if left < 1 then left = 1 end
  return left
end

if op == "create" then
  if call('EXISTS', KEYS[1]) == 1 then
    return 0
  end
  local created = now
  if ARGV[7] ~= "" then created = tonumber(ARGV[7]) end
  call('HSET', KEYS[1], 'o', owner, 'g', gen, 'c', string.format('%d', created),
       'l', string.format('%d', now))
  call('PEXPIRE', KEYS[1], ttl(created))
  return 1
end

local rec = call('HMGET', KEYS[1], 'o', 'g', 'c', 'l')
if not rec[1] then
  return {0, 0}
end
local created = tonumber(rec[3])
local last = tonumber(rec[4])
if rec[2] ~= gen then
  -- The caller passed the presenting user's generation; only the owner's
  -- generation decides, so a non-owner's mismatch is "not owned", not a kill.
  if rec[1] ~= owner then
    return {2, created}
  end
  call('DEL', KEYS[1])
  return {0, created}
end
if now >= created + absolute or now >= last + idle then
  call('DEL', KEYS[1])
  return {1, created}
end
if rec[1] ~= owner then
  return {2, created}
end
if op == "take" or op == "revoke" then
  call('DEL', KEYS[1])
else
  if now > last then
    call('HSET', KEYS[1], 'l', string.format('%d', now))
  end
  call('PEXPIRE', KEYS[1], ttl(created))
end
return {3, created}
