-- Evict a context entry (and its pending write-behind) unless it is newer than a version; a damaged
-- entry is always evicted.
-- KEYS: 1 context entry, 2 its applied steps, 3 write-behind due set, 4 write-behind first-change hash
-- ARGV: 1 version (-1: evict whatever it holds), 2 context id
-- Returns 1 if evicted.
-- Bookkeeping keys holding something else (damage) are dropped and rebuilt, never a script error.
local function expect(key, kind)
  local found = redis.call('TYPE', key)['ok']
  if found ~= 'none' and found ~= kind then redis.call('DEL', key) end
end
expect(KEYS[3], 'zset')
expect(KEYS[4], 'hash')
local cur = redis.call('HGET', KEYS[1], 'v')
if cur == false then return 0 end
local version = tonumber(cur)
if version ~= nil and tonumber(ARGV[1]) >= 0 and version > tonumber(ARGV[1]) then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('HDEL', KEYS[4], ARGV[2])
return 1
