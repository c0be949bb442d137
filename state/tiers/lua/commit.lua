-- Compare-and-set of a context, scheduling of its write-behind and the commit broadcast, in one atomic
-- step. An entry is {v: version, e: epoch, c: checksum, d: payload, o: origin, n: applied count}:
-- origin 'l' is a live lineage (created, committed to, or rebuilt by a rewind), 'f' a copy filled from
-- L3 for readers. The steps a context holds are a sorted set beside it (a commit adds its step instead
-- of rewriting the run's history); n counts them, so a lost or damaged set is seen, never trusted.
-- KEYS: 1 context entry, 2 its applied steps, 3 write-behind due set, 4 write-behind first-change hash,
--       5 the context's history list (ARGV[19] is pushed onto it),
--       [6 the step's record hash, 7 the run's progress record, 8 the run's failed flag: present when
--       they share the context's node (always on one Redis; never on a cluster),
--       9 a broker queue (a list) to push ARGV[17] onto: the successor's message (with KEYS 6-8 only)]
-- ARGV, in the order of `state.tiers.redis.contexts.COMMIT_ARGV`, which builds them from named fields:
--       1 expected version, 2 new version, 3 payload, 4 checksum, 5 now, 6 debounce s, 7 max delay s,
--       8 context id, 9 control channel ('' = do not broadcast), 10 expected epoch (-1: any),
--       11 new epoch, 12 '1' if the entry must be live, 13 step id ('' = not a step's commit),
--       14 step record (JSON, with KEYS 5-7), 15 records TTL s, 16 the broadcast (a `state.bus`
--       message, published as it is), 17 the message to push onto KEYS[8] ('' without it), 18 how many
--       versions behind a stale writer is told the steps since its version, 19 the commit's history
--       entry ('' = none), 20 the watch channel ('' = do not publish), 21 what to publish on it,
--       22 the database of the broker queue KEYS[9] when it is not L2's ('' = L2's), 23 L2's database,
--       24 how many detached values to write (k), 25 .. 24+2k their fields and data, then the
--       fields of detached values to drop (`state.detached`)
-- Returns {status, version}: 1 committed; 0 stale write (version: the current one; then also the
-- current payload, its checksum and, when at most ARGV[18] versions came since the one expected, the
-- steps of those commits with their versions, so the writer can apply its changes again without a
-- read); -1 no entry though a version was expected; -2 the entry is of another epoch, or not live
-- though it had to be; -3 the entry is damaged; 2 the step is applied already; 3 the run failed
-- (nothing written).
-- A bookkeeping key holding another type of value (damage) is dropped and written anew where it is
-- used, never a script error: an error after the first write would leave the commit half done. (No
-- TYPE check up front: this script is every step's one round trip, and each call inside it costs.)
local function repaired(command, key, ...)
  local reply = redis.pcall(command, key, ...)
  if type(reply) == 'table' and reply.err then
    redis.call('DEL', key)
    reply = redis.call(command, key, ...)
  end
  return reply
end
local cur = redis.call('HMGET', KEYS[1], 'v', 'e', 'o', 'n')
local expected = tonumber(ARGV[1])
local step = ARGV[13]
local origin = 'l'
local current = 0
local applied = 0
if cur[1] == false then
  if expected ~= 0 then return {-1, 0} end
  redis.call('DEL', KEYS[2])
else
  local version, epoch = tonumber(cur[1]), tonumber(cur[2] or '1')
  applied = tonumber(cur[4] or '0')
  if version == nil or epoch == nil or applied == nil then return {-3, 0} end
  local count = redis.pcall('ZCARD', KEYS[2])  -- an error: the set holds another type
  if type(count) ~= 'number' or count ~= applied then return {-3, 0} end
  if tonumber(ARGV[10]) >= 0 and epoch ~= tonumber(ARGV[10]) then return {-2, version} end
  if ARGV[12] == '1' and cur[3] ~= 'l' then return {-2, version} end
  current = version
  origin = cur[3] or 'f'
end
if step ~= '' and redis.call('ZSCORE', KEYS[2], step) then return {2, current} end
if KEYS[8] and redis.call('EXISTS', KEYS[8]) == 1 then return {3, current} end
if cur[1] ~= false and current ~= expected then
  local entry = redis.call('HMGET', KEYS[1], 'd', 'c')
  local since = {}
  if current > expected and current - expected <= tonumber(ARGV[18]) then
    since = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. expected, '+inf', 'WITHSCORES')
  end
  return {0, current, entry[1], entry[2], since}
end
if step ~= '' then
  redis.call('ZADD', KEYS[2], tonumber(ARGV[2]), step)
  applied = applied + 1
end
redis.call('HSET', KEYS[1], 'v', ARGV[2], 'e', ARGV[11], 'c', ARGV[4], 'd', ARGV[3], 'o', origin, 'n', applied)
local writes = tonumber(ARGV[24])
for i = 25, 24 + 2 * writes, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
for i = 25 + 2 * writes, #ARGV do
  redis.call('HDEL', KEYS[1], ARGV[i])
end
redis.call('PERSIST', KEYS[1])  -- a dirty entry never expires
redis.call('PERSIST', KEYS[2])
local now = tonumber(ARGV[5])
local first = tonumber(repaired('HGET', KEYS[4], ARGV[8]) or '')
if first == nil then
  repaired('HSET', KEYS[4], ARGV[8], ARGV[5])
  first = now
end
repaired('ZADD', KEYS[3], math.min(now + tonumber(ARGV[6]), first + tonumber(ARGV[7])), ARGV[8])
if ARGV[19] ~= '' then
  repaired('RPUSH', KEYS[5], ARGV[19])
  redis.call('PERSIST', KEYS[5])
end
if KEYS[6] then
  repaired('HSET', KEYS[6], step, ARGV[14])
  redis.call('SET', KEYS[7], ARGV[5], 'EX', ARGV[15])
end
if KEYS[9] then
  -- The transactional outbox: what follows the step is sent if, and only if, the step committed.
  -- A broker in another database of this server: a script's SELECT is its own (since Redis 2.8.12 it
  -- leaves the caller's connection where it was), and it selects L2's again for what follows.
  if ARGV[22] ~= '' then redis.call('SELECT', ARGV[22]) end
  repaired('LPUSH', KEYS[9], ARGV[17])
  if ARGV[22] ~= '' then redis.call('SELECT', ARGV[23]) end
end
if ARGV[20] ~= '' then
  redis.call('PUBLISH', ARGV[20], ARGV[21])
end
if ARGV[9] ~= '' then
  redis.call('PUBLISH', ARGV[9], ARGV[16])
end
return {1, tonumber(ARGV[2])}
