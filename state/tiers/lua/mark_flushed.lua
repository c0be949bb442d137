-- After an L3 write of (epoch, version): if nothing newer was committed meanwhile, the entry is clean
-- (and, when asked, gets its TTL: a finished run's contexts). Otherwise the newer changes wait for a
-- write of their own, their window starting now.
-- KEYS: 1 context entry, 2 write-behind due set, 3 write-behind first-change hash
-- ARGV: 1 version written, 2 TTL s (0: keep no TTL), 3 context id, 4 now, 5 debounce s, 6 epoch written
-- Returns 1 if the entry is clean.
local cur = redis.call('HMGET', KEYS[1], 'v', 'e')
if cur[1] ~= false then
  local epoch, written_epoch = tonumber(cur[2] or '1'), tonumber(ARGV[6])
  if epoch > written_epoch or (epoch == written_epoch and tonumber(cur[1]) > tonumber(ARGV[1])) then
    redis.call('HSET', KEYS[3], ARGV[3], ARGV[4])
    redis.call('ZADD', KEYS[2], tonumber(ARGV[4]) + tonumber(ARGV[5]), ARGV[3])
    return 0
  end
end
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('HDEL', KEYS[3], ARGV[3])
if cur[1] ~= false and tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 1
