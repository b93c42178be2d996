#!lua
-- note_cleanup: remember a cleanup attempt's backend run, so the next attempt asks it first.
-- KEYS[1] session hash      <prefix>:{sNNN}:session:<tenant>:<run>:<node>:<binding>:<agent>
-- ARGV[1] cleanup backend run id: text
-- ARGV[2] attempt: integer (0 = the base idempotency key, n = its ":retry-n" form)
-- returns {0}  OK: remembered (bookkeeping only: no version bump, nothing to flush)
--         {4}  NOOP: the session is missing or not cleaning; nothing written
local session, run_id, attempt = KEYS[1], ARGV[1], ARGV[2]
if redis.call('HGET', session, 'status') ~= 'cleaning' then
  return {4}
end
redis.call('HSET', session, 'cleanup_run_id', run_id, 'cleanup_attempt', attempt)
return {0}
