-- Compare-and-set of a context, scheduling of its write-behind and the invalidation broadcast, in one
-- atomic step. An entry is {v: version, e: epoch, c: checksum, d: payload, o: origin}: origin 'l' is a
-- live lineage (created, committed to, or rebuilt by a rewind), 'f' a copy filled from L3 for readers.
-- KEYS: 1 context entry, 2 write-behind due set, 3 write-behind first-change hash,
--       [4 the run's step records, 5 the run's progress record: a step's commit records the step too]
-- ARGV: 1 expected version, 2 new version, 3 payload, 4 checksum, 5 now, 6 debounce s, 7 max delay s,
--       8 context id, 9 control channel ('' = do not broadcast), 10 expected epoch (-1: any),
--       11 new epoch, 12 '1' if the entry must be live (a step's commit),
--       [13 step id, 14 step record (JSON), 15 records TTL s]
-- Returns {status, version}: 1 committed; 0 stale write (version: the current one); -1 no entry though
-- a version was expected; -2 the entry is of another epoch, or not live though it had to be;
-- -3 the entry is damaged (its version or epoch is not a number).
-- Bookkeeping keys holding something else (damage) are dropped and rebuilt, never a script error.
local function expect(key, kind)
  local found = redis.call('TYPE', key)['ok']
  if found ~= 'none' and found ~= kind then redis.call('DEL', key) end
end
expect(KEYS[2], 'zset')
expect(KEYS[3], 'hash')
if KEYS[4] then expect(KEYS[4], 'hash') end
local cur = redis.call('HMGET', KEYS[1], 'v', 'e', 'o')
local expected = tonumber(ARGV[1])
local origin = 'l'
if cur[1] == false then
  if expected ~= 0 then return {-1, 0} end
else
  local version, epoch = tonumber(cur[1]), tonumber(cur[2] or '1')
  if version == nil or epoch == nil then return {-3, 0} end
  if tonumber(ARGV[10]) >= 0 and epoch ~= tonumber(ARGV[10]) then return {-2, version} end
  if ARGV[12] == '1' and cur[3] ~= 'l' then return {-2, version} end
  if version ~= expected then return {0, version} end
  origin = cur[3] or 'f'
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'e', ARGV[11], 'c', ARGV[4], 'd', ARGV[3], 'o', origin)
redis.call('PERSIST', KEYS[1])  -- a dirty entry never expires
local now = tonumber(ARGV[5])
local first = tonumber(redis.call('HGET', KEYS[3], ARGV[8]) or '')
if first == nil then
  redis.call('HSET', KEYS[3], ARGV[8], ARGV[5])
  first = now
end
redis.call('ZADD', KEYS[2], math.min(now + tonumber(ARGV[6]), first + tonumber(ARGV[7])), ARGV[8])
if KEYS[4] then
  redis.call('HSET', KEYS[4], ARGV[13], ARGV[14])
  redis.call('SET', KEYS[5], ARGV[5], 'EX', ARGV[15])
end
if ARGV[9] ~= '' then
  redis.call('PUBLISH', ARGV[9], cjson.encode({type = 'context', id = ARGV[8], version = tonumber(ARGV[2])}))
end
return {1, tonumber(ARGV[2])}
