-- raceguard durable queue: create the stream and its consumer group if
-- missing (after a restart without persistence, or before the first
-- submit). Idempotent.
-- KEYS[1]  the stream
-- ARGV[1]  the consumer group
local r = redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
if type(r) == 'table' and r.err and not string.find(r.err, 'BUSYGROUP', 1, true) then
  return r
end
return 1
