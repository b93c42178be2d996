#!lua flags=allow-oom
-- take_lock: take a shard's flush lock, or extend it when this holder already has it.
-- allow-oom: a flush shrinks the backlog, so it must run when Redis is over maxmemory.
-- KEYS[1] flush lock  <prefix>:{sNNN}:flush_lock
-- ARGV[1] holder token: text (host:pid:random), stored as the lock's value
-- ARGV[2] lifetime: integer milliseconds from now
-- returns {0}  OK: the token holds the lock for ARGV[2] ms
--         {4}  NOOP: another holder has it; nothing written
local lock, token, ttl = KEYS[1], ARGV[1], ARGV[2]
local holder = redis.call('GET', lock)
if holder == token then
  redis.call('PEXPIRE', lock, ttl)
  return {0}
end
if holder then
  return {4}
end
redis.call('SET', lock, token, 'PX', ttl)
return {0}
