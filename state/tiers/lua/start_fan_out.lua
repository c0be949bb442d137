-- A fan-out starts, or a rebuilt run sets its count from what its contexts show.
-- KEYS: 1 the fan-out's hash (see end_item.lua)
-- ARGV: 1 how many items, 2 the records' TTL s, 3 '1' to replace what is there (a rebuilt run),
--       then pairs: an ended item's index, '1' if it failed
-- Returns how many items ended so far.
if ARGV[3] ~= '1' and redis.call('EXISTS', KEYS[1]) == 1 then
  return tonumber(redis.call('HGET', KEYS[1], '#ended') or '0')
end
redis.call('DEL', KEYS[1])
local ended, failed = 0, 0
for i = 4, #ARGV, 2 do
  ended = ended + 1
  redis.call('HSET', KEYS[1], 'i' .. ARGV[i], ended)
  if ARGV[i + 1] == '1' then failed = failed + 1 end
end
redis.call('HSET', KEYS[1], '#n', ARGV[1], '#ended', ended, '#failed', failed)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return ended
