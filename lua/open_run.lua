#!lua
-- open_run: read-through of a run Postgres does not know as ended: mark it open if unmarked.
-- KEYS[1] run hash          <prefix>:{sNNN}:run:<tenant>:<run>
-- ARGV[1] TTL of an open run's hash: integer milliseconds (opened_at is Redis's TIME)
-- returns {0}  OK: marked open
--         {5}  EXISTS: the run hash is there (open or ended); nothing written
local run, ttl = KEYS[1], ARGV[1]
if redis.call('EXISTS', run) == 1 then
  return {5}
end
redis.call('HSET', run, 'state', 'open', 'opened_at', iso_of(now_ms()))
redis.call('PEXPIRE', run, ttl)
return {0}
