-- raceguard lock: compare-and-delete.
-- KEYS[1] the lock key; ARGV[1] the owner token.
-- Returns 1 when this owner's lock was deleted, 0 when the key was gone or
-- belonged to another owner (then it is left untouched).
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
