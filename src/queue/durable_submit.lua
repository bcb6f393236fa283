-- raceguard durable queue: submit one job, at most once per idempotency key.
-- KEYS[1]  the stream                  rq:{<queue>}:stream
-- KEYS[2]  the job's idempotency record rq:{<queue>}:job:<idempotency key>
--          (one hash tag: both keys share a slot)
-- ARGV[1]  the consumer group
-- ARGV[2]  the capacity (most entries in the stream at once)
-- ARGV[3]  the idempotency key (raw)
-- ARGV[4]  the payload
-- Returns {1, id}          accepted (XADDed as entry `id`)
--         {0, id, state}   duplicate: the key is known ('q' queued,
--                          'd' completed, 'x' dead-lettered)
--         {-1}             full: nothing written
-- The record is checked before the capacity, so a retry of an accepted
-- submit is reported as a duplicate even when the queue is full.
local rec = redis.call('HMGET', KEYS[2], 's', 'id')
if rec[1] then
  return {0, rec[2] or '', rec[1]}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  -- First use (or the stream was lost): create it with the group, reading
  -- from the start so no entry added later is skipped.
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[2]) then
  return {-1}
end
local id = redis.call('XADD', KEYS[1], '*', 'k', ARGV[3], 'p', ARGV[4])
-- No expiry while queued: the record must outlive the job.
redis.call('HSET', KEYS[2], 's', 'q', 'id', id)
return {1, id}
