-- raceguard durable queue: complete one delivered job.
-- KEYS[1]  the stream
-- KEYS[2]  the job's idempotency record
-- ARGV[1]  the consumer group
-- ARGV[2]  the entry id
-- ARGV[3]  the consumer acknowledging
-- ARGV[4]  how long the completed record is kept (ms), the dedupe window
-- Returns 1 completed now (marked done, XACKed and XDELed in one step)
--         2 already completed (by anyone); a leftover entry owned by the
--           caller is cleaned up
--         3 not owned: the entry is not pending under this consumer (it was
--           reclaimed by another one, dead-lettered, or never delivered);
--           nothing changed
local rec = redis.call('HMGET', KEYS[2], 's', 'id')
local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
local mine = type(p) == 'table' and p[1] ~= nil and p[1][2] == ARGV[3]
if rec[1] == 'd' then
  if mine then
    redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
    redis.call('XDEL', KEYS[1], ARGV[2])
  end
  return 2
end
if not mine then
  return 3
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], 's', 'd', 'id', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
