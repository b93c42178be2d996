#!lua flags=allow-oom
-- load: read a session and its run's state; renew the TTL of a clean, resumable session.
-- allow-oom: a read; its only write renews a TTL, which never grows memory.
-- KEYS[1] session hash      <prefix>:{sNNN}:session:<tenant>:<run>:<node>:<binding>:<agent>
-- KEYS[2] run hash          <prefix>:{sNNN}:run:<tenant>:<run>
-- ARGV[1] TTL of a clean resumable session: integer milliseconds
-- returns {0, run_state, field, value, ...}  OK: run_state is "open", "ended" or "" (no marker);
--                                            no field/value pairs when the session is missing
local session, run, ttl = KEYS[1], KEYS[2], ARGV[1]
-- A dirty session has no TTL and keeps none; only an active session with a TTL is renewed,
-- so it cannot expire between a node's entry and its exit.
local reply = redis.call('HGETALL', session)
local state = redis.call('HGET', run, 'state') or ''
if #reply > 0 and redis.call('PTTL', session) > 0 and redis.call('HGET', session, 'status') == 'active' then
  redis.call('PEXPIRE', session, ttl)
end
table.insert(reply, 1, state)
table.insert(reply, 1, 0)
return reply
