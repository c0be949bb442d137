-- After an L3 write of a version: if nothing newer was committed meanwhile, the entry is clean and
-- gets its TTL. Otherwise the newer changes wait for a write of their own, their window starting now.
-- KEYS: 1 context entry, 2 write-behind due set, 3 write-behind first-change hash
-- ARGV: 1 version written, 2 TTL s, 3 context id, 4 now, 5 debounce s
-- Returns 1 if the entry is clean.
local cur = redis.call('HGET', KEYS[1], 'v')
if cur ~= false and tonumber(cur) > tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
  redis.call('ZADD', KEYS[2], tonumber(ARGV[4]) + tonumber(ARGV[5]), ARGV[3])
  return 0
end
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('HDEL', KEYS[3], ARGV[3])
if cur ~= false then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 1
