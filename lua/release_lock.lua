#!lua flags=allow-oom
-- release_lock: give a shard's flush lock up if this holder has it; wake one waiter.
-- allow-oom: a flush shrinks the backlog, so it must run when Redis is over maxmemory.
-- KEYS[1] flush lock  <prefix>:{sNNN}:flush_lock
-- KEYS[2] its free list  <prefix>:{sNNN}:flush_lock_free; absent for a cleanup lease
--         (<prefix>:cleanup_lease:<sha1> as KEYS[1]), which nobody waits for
-- ARGV[1] holder token: text, as given to take_lock
-- returns {0}  OK: released
--         {4}  NOOP: the lock expired or another holder has it; nothing written
if give_up_lock(KEYS[1], KEYS[2], ARGV[1]) == 0 then
  return {4}
end
return {0}
