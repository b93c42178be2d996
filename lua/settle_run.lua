#!lua
-- settle_run: every session of an ended run is cleaned; its markers may now expire.
-- KEYS[1] run hash          <prefix>:{sNNN}:run:<tenant>:<run>
-- KEYS[2] run session set   <prefix>:{sNNN}:run:<tenant>:<run>:sessions
-- ARGV[1] TTL of the settled run's hash and session set: integer milliseconds
-- returns {0}  OK: the TTLs are set
--         {4}  NOOP: the run is not ended here; nothing written
local run, run_sessions, ttl = KEYS[1], KEYS[2], ARGV[1]
if redis.call('HGET', run, 'state') ~= 'ended' then
  return {4}
end
redis.call('HSET', run, 'settled', '1')
redis.call('PEXPIRE', run, ttl)
redis.call('PEXPIRE', run_sessions, ttl)
return {0}
