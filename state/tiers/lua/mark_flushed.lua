-- After an L3 write of (epoch, version): if nothing newer was committed meanwhile, the entry is clean
-- (and, when asked, gets its TTL: a finished run's contexts). Otherwise the newer changes wait for a
-- write of their own, their window starting now. A damaged entry is dropped: L3 has what it needs.
-- The history entries that went to L3 with it leave the list first: those up to the last one taken
-- (ARGV[7]), wherever it is now (another write may have taken some of them already; what came after
-- it stays for a later write).
-- KEYS: 1 context entry, 2 its applied steps, 3 write-behind due set, 4 write-behind first-change hash,
--       5 the context's history list
-- ARGV: 1 version written, 2 TTL s (0: keep no TTL), 3 context id, 4 now, 5 debounce s, 6 epoch written,
--       7 the last history entry L3 took ('' = none)
-- Returns 1 if the entry is clean (or gone).
-- Bookkeeping keys holding something else (damage) are dropped and rebuilt, never a script error.
local function expect(key, kind)
  local found = redis.call('TYPE', key)['ok']
  if found ~= 'none' and found ~= kind then redis.call('DEL', key) end
end
expect(KEYS[3], 'zset')
expect(KEYS[4], 'hash')
expect(KEYS[5], 'list')
if ARGV[7] ~= '' then
  local last = redis.call('LPOS', KEYS[5], ARGV[7])
  if last then redis.call('LTRIM', KEYS[5], last + 1, -1) end
end
local cur = redis.call('HMGET', KEYS[1], 'v', 'e')
local version, epoch = tonumber(cur[1] or ''), tonumber(cur[2] or '1')
if cur[1] ~= false and (version == nil or epoch == nil) then
  redis.call('DEL', KEYS[1], KEYS[2])
elseif cur[1] ~= false then
  local written_epoch = tonumber(ARGV[6])
  if epoch > written_epoch or (epoch == written_epoch and version > tonumber(ARGV[1])) then
    redis.call('HSET', KEYS[4], ARGV[3], ARGV[4])
    redis.call('ZADD', KEYS[3], tonumber(ARGV[4]) + tonumber(ARGV[5]), ARGV[3])
    return 0
  end
  if tonumber(ARGV[2]) > 0 then
    redis.call('EXPIRE', KEYS[1], ARGV[2])
    redis.call('EXPIRE', KEYS[2], ARGV[2])
    redis.call('EXPIRE', KEYS[5], ARGV[2])
  end
end
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('HDEL', KEYS[4], ARGV[3])
return 1
