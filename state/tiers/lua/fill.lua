-- Fill a context entry from L3: never replaces an entry holding that version or a newer one.
-- KEYS: 1 context entry
-- ARGV: 1 version, 2 payload, 3 checksum, 4 TTL s
-- Returns 1 if written.
local cur = redis.call('HGET', KEYS[1], 'v')
if cur ~= false and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'c', ARGV[3], 'd', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
