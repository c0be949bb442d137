-- An item of a fan-out ended: count it once, however often its end is told.
-- KEYS: 1 the fan-out's hash (field '#n': how many items; '#ended', '#failed': counts; 'i<index>': the
--       rank the item ended with)
-- ARGV: 1 the item's index, 2 '1' if it failed, 3 the records' TTL s
-- Returns {rank, total, failed}: rank 0 when the fan-out's record is not there (lost: the run is
-- rebuilt from its contexts, which say which items ended).
local total = redis.call('HGET', KEYS[1], '#n')
if not total then return {0, 0, 0} end
local field = 'i' .. ARGV[1]
local rank = redis.call('HGET', KEYS[1], field)
if not rank then
  rank = redis.call('HINCRBY', KEYS[1], '#ended', 1)
  redis.call('HSET', KEYS[1], field, rank)
  if ARGV[2] == '1' then redis.call('HINCRBY', KEYS[1], '#failed', 1) end
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
end
return {tonumber(rank), tonumber(total), tonumber(redis.call('HGET', KEYS[1], '#failed') or '0')}
