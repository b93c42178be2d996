#!lua flags=allow-oom
-- ack_flush: record which versions reached Postgres; clean only what did not move on.
-- allow-oom: acknowledging shrinks the backlog (and gives clean sessions a TTL).
-- KEYS[1] shard dirty zset   <prefix>:{sNNN}:dirty
-- KEYS[2] shard poison hash  <prefix>:{sNNN}:poison (a flushed session leaves it)
-- KEYS[3] shard flush lock   <prefix>:{sNNN}:flush_lock
-- KEYS[4] its free list      <prefix>:{sNNN}:flush_lock_free (a release wakes one waiter)
-- KEYS[5..] session hashes that were flushed  <prefix>:{sNNN}:session:...
-- ARGV[1] TTL of a clean session that may be resumed or cleaned up: integer milliseconds
-- ARGV[2] TTL of a clean, cleaned session of an ended run (run_ended=1): integer milliseconds
-- ARGV[3] holder token of the flush lock to release afterwards, if it still holds it; ""
--         leaves the lock alone
-- ARGV[4..] the version Postgres holds for KEYS[5..], in the same order: integers
-- returns {0, acked, still_dirty, released}  OK: acked = sessions made clean, still_dirty =
--         moved on (their first-dirty time becomes the time of this ack), released = 1 if
--         the lock was released
local dirty, poison, lock, free = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local resumable_ttl, ended_ttl, token = ARGV[1], ARGV[2], ARGV[3]
local acked, still_dirty = 0, 0
local now = now_ms()
for i = 5, #KEYS do
  local session, flushed = KEYS[i], tonumber(ARGV[i - 1])
  local stored = redis.call('HMGET', session, 'version', 'flushed_version', 'status', 'run_ended')
  if not stored[1] then
    redis.call('ZREM', dirty, session)
  else
    if flushed > tonumber(stored[2] or '0') then
      redis.call('HSET', session, 'flushed_version', flushed)
    end
    if tonumber(stored[1]) == flushed then
      redis.call('ZREM', dirty, session)
      redis.call('HDEL', poison, session)
      if stored[3] == 'cleaned' and stored[4] == '1' then
        redis.call('PEXPIRE', session, ended_ttl)
      else
        redis.call('PEXPIRE', session, resumable_ttl)
      end
      acked = acked + 1
    else
      -- Saved again while it was being flushed: what is left is younger than this ack, so
      -- it waits a full flush delay again instead of being flushed at the next pass.
      redis.call('ZADD', dirty, 'XX', now, session)
      still_dirty = still_dirty + 1
    end
  end
end
return {0, acked, still_dirty, give_up_lock(lock, free, token)}
