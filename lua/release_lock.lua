#!lua flags=allow-oom
-- release_lock: give a shard's flush lock up, only if this holder still has it.
-- allow-oom: a flush shrinks the backlog, so it must run when Redis is over maxmemory.
-- KEYS[1] flush lock  <prefix>:{sNNN}:flush_lock
-- ARGV[1] holder token: text, as given to take_lock
-- returns {0}  OK: released
--         {4}  NOOP: the lock expired or another holder has it; nothing written
local lock, token = KEYS[1], ARGV[1]
if redis.call('GET', lock) ~= token then
  return {4}
end
redis.call('DEL', lock)
return {0}
