-- Claim the write-behinds that are due: each is pushed a lease ahead, so one process dispatches it;
-- if that process dies before the write, it comes due again when the lease runs out.
-- KEYS: 1 write-behind due set
-- ARGV: 1 now, 2 lease s, 3 most to claim
-- Returns the claimed context ids.
-- Bookkeeping keys holding something else (damage) are dropped and rebuilt, never a script error.
local function expect(key, kind)
  local found = redis.call('TYPE', key)['ok']
  if found ~= 'none' and found ~= kind then redis.call('DEL', key) end
end
expect(KEYS[1], 'zset')
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do
  redis.call('ZADD', KEYS[1], 'XX', tonumber(ARGV[1]) + tonumber(ARGV[2]), id)
end
return ids
