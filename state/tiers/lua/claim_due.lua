-- Claim the write-behinds that are due: each is pushed a lease ahead, so one process dispatches it;
-- if that process dies before the write, it comes due again when the lease runs out.
-- KEYS: write-behind due sets (one on a cluster, where each shard's is claimed by itself; every
--       shard's on one server, looked at from the shard ARGV[4] on, so that none waits behind another)
-- ARGV: 1 now, 2 lease s, 3 most to claim, 4 the key to start from (1-based; 1 if absent)
-- Returns the claimed context ids.
-- Bookkeeping keys holding something else (damage) are dropped and rebuilt, never a script error.
local function expect(key, kind)
  local found = redis.call('TYPE', key)['ok']
  if found ~= 'none' and found ~= kind then redis.call('DEL', key) end
end
local claimed = {}
local limit = tonumber(ARGV[3])
local start = tonumber(ARGV[4] or '1')
for n = 0, #KEYS - 1 do
  if #claimed >= limit then break end
  local key = KEYS[(start - 1 + n) % #KEYS + 1]
  expect(key, 'zset')
  local ids = redis.call('ZRANGEBYSCORE', key, '-inf', ARGV[1], 'LIMIT', 0, limit - #claimed)
  for _, id in ipairs(ids) do
    redis.call('ZADD', key, 'XX', tonumber(ARGV[1]) + tonumber(ARGV[2]), id)
    claimed[#claimed + 1] = id
  end
end
return claimed
