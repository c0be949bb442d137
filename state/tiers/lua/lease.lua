-- Take a lease, or renew it if this holder has it already.
-- KEYS: 1 lease
-- ARGV: 1 holder, 2 TTL ms
-- Returns 1 if the caller holds the lease now.
local holder = redis.call('GET', KEYS[1])
if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
