-- Fill a context entry: a reader's copy from L3 (origin 'f', with a TTL), or the start of a live lineage
-- (origin 'l', no TTL: a new context, or one rebuilt by a rewind). Never replaces an entry of a newer
-- epoch, nor one of the same epoch holding that version or a newer one; a damaged entry is replaced.
-- KEYS: 1 context entry, 2 its applied steps
-- ARGV: 1 version, 2 payload, 3 checksum, 4 TTL s (0: none), 5 epoch, 6 origin ('l' or 'f'),
--       7 how many detached values (k), 8 .. 7+2k their fields and data (`state.detached`),
--       then the applied step ids, oldest first
-- Returns 1 if written.
local cur = redis.call('HMGET', KEYS[1], 'v', 'e')
local version, epoch = tonumber(cur[1] or ''), tonumber(cur[2] or '1')
if version ~= nil and epoch ~= nil then
  local new_epoch = tonumber(ARGV[5])
  if epoch > new_epoch or (epoch == new_epoch and version >= tonumber(ARGV[1])) then return 0 end
end
local first = 8 + 2 * tonumber(ARGV[7])  -- the first applied step id
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'e', ARGV[5], 'c', ARGV[3], 'd', ARGV[2], 'o', ARGV[6], 'n', #ARGV - first + 1)
for i = 8, first - 1, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
for i = first, #ARGV, 1000 do
  local batch = {}
  for j = i, math.min(i + 999, #ARGV) do
    batch[#batch + 1] = j - first + 1
    batch[#batch + 1] = ARGV[j]
  end
  redis.call('ZADD', KEYS[2], unpack(batch))
end
if tonumber(ARGV[4]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
return 1
