-- Compare-and-set of a context, scheduling of its write-behind and the invalidation broadcast, in one
-- atomic step.
-- KEYS: 1 context entry, 2 write-behind due set, 3 write-behind first-change hash
-- ARGV: 1 expected version, 2 new version, 3 payload, 4 checksum, 5 now, 6 debounce s, 7 max delay s,
--       8 context id, 9 control channel ('' = do not broadcast)
-- Returns {status, version}: 1 committed, 0 stale write (version: the current one),
-- -1 no entry though a version was expected.
local cur = redis.call('HGET', KEYS[1], 'v')
local expected = tonumber(ARGV[1])
if cur == false then
  if expected ~= 0 then return {-1, 0} end
elseif tonumber(cur) ~= expected then
  return {0, tonumber(cur)}
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'c', ARGV[4], 'd', ARGV[3])
redis.call('PERSIST', KEYS[1])  -- a dirty entry never expires
local now = tonumber(ARGV[5])
local first = redis.call('HGET', KEYS[3], ARGV[8])
if first == false then
  redis.call('HSET', KEYS[3], ARGV[8], ARGV[5])
  first = now
else
  first = tonumber(first)
end
redis.call('ZADD', KEYS[2], math.min(now + tonumber(ARGV[6]), first + tonumber(ARGV[7])), ARGV[8])
if ARGV[9] ~= '' then
  redis.call('PUBLISH', ARGV[9], cjson.encode({type = 'context', id = ARGV[8], version = tonumber(ARGV[2])}))
end
return {1, tonumber(ARGV[2])}
