-- Read a context entry, its applied steps and whether it waits for its L3 write, atomically (a
-- commit between the reads would otherwise pair an entry with another version's applied steps).
-- KEYS: 1 context entry, 2 its applied steps, 3 write-behind due set
-- ARGV: 1 context id, 2 how many of the newest applied steps to give with their scores
-- Returns {{v, c, d, o, n}, applied step ids (oldest first), due time or false, the newest applied
-- steps with their scores (a commit scores its step with the version it made; a fill, by position),
-- the entry's detached values as {field, data, ...} (`state.detached`)};
-- a key holding another type raises WRONGTYPE (the caller treats the entry as damaged).
local entry = redis.call('HMGET', KEYS[1], 'v', 'c', 'd', 'o', 'n')
local applied = redis.call('ZRANGE', KEYS[2], 0, -1)
local due = redis.call('ZSCORE', KEYS[3], ARGV[1])
local newest = redis.call('ZRANGE', KEYS[2], -tonumber(ARGV[2]), -1, 'WITHSCORES')
local detached = {}
if entry[3] and string.find(entry[3], '"$detached"', 1, true) then
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 2) == 'x:' then
      detached[#detached + 1] = all[i]
      detached[#detached + 1] = all[i + 1]
    end
  end
end
return {entry, applied, due, newest, detached}
