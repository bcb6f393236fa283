-- raceguard lock: compare-and-extend.
-- KEYS[1] the lock key; ARGV[1] the owner token; ARGV[2] the new TTL in ms.
-- Returns 1 when this owner's lock was extended, 0 when the key was gone or
-- belonged to another owner. Never creates the key: an expired lock is
-- never re-taken by a renewal.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
