-- raceguard durable queue: decide what to do with entries just claimed by
-- (or delivered to) one consumer, before any is handed to a handler.
-- KEYS[1]     the stream
-- KEYS[2]     the dead-letter stream
-- KEYS[2+i]   the idempotency record of entry i
-- ARGV[1]     the consumer group
-- ARGV[2]     the consumer
-- ARGV[3]     max attempts (0: unlimited)
-- ARGV[4]     how long a settled record is kept (ms)
-- ARGV[5]     the dead-letter stream's approximate max length
-- ARGV[5+2i-1] entry i's id
-- ARGV[5+2i]   entry i's mode: 'c' check, 'b' malformed (dead-letter it)
-- Returns one {verdict, attempts} per entry:
--   verdict 0  no longer pending under this consumer: skip it
--           1  already completed: acked and deleted, skip it
--           2  dead-lettered (too many attempts, or malformed)
--           3  deliver it
local out = {}
local max = tonumber(ARGV[3])
local n = #KEYS - 2
for i = 1, n do
  local id = ARGV[5 + 2 * i - 1]
  local mode = ARGV[5 + 2 * i]
  local rec = KEYS[2 + i]
  local p = redis.pcall('XPENDING', KEYS[1], ARGV[1], id, id, 1)
  if type(p) ~= 'table' or p[1] == nil or p[1][2] ~= ARGV[2] then
    out[i] = {0, 0}
  else
    local attempts = p[1][4]
    local state = false
    if mode == 'c' then
      state = redis.call('HGET', rec, 's')
    end
    if state == 'd' then
      redis.call('XACK', KEYS[1], ARGV[1], id)
      redis.call('XDEL', KEYS[1], id)
      out[i] = {1, attempts}
    elseif mode == 'b' or (max > 0 and attempts > max) then
      local e = redis.call('XRANGE', KEYS[1], id, id)
      local fields = {}
      if e[1] then
        fields = e[1][2]
      end
      local args = {'XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*'}
      for _, f in ipairs(fields) do
        args[#args + 1] = f
      end
      args[#args + 1] = 'src'
      args[#args + 1] = id
      args[#args + 1] = 'attempts'
      args[#args + 1] = tostring(attempts)
      redis.call(unpack(args))
      redis.call('XACK', KEYS[1], ARGV[1], id)
      redis.call('XDEL', KEYS[1], id)
      if mode == 'c' then
        redis.call('HSET', rec, 's', 'x', 'id', id)
        redis.call('PEXPIRE', rec, ARGV[4])
      end
      out[i] = {2, attempts}
    else
      out[i] = {3, attempts}
    end
  end
end
return out
