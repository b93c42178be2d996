#!lua flags=allow-oom
-- retry_poisoned: an operator sends a parked session back to the flush (after fixing why).
-- allow-oom: it moves a session from the poison hash back to the backlog; it grows nothing.
-- With ARGV[1] = "1" the operator takes this Redis copy over Postgres's (a session parked
-- because Redis went back in time, or because Postgres holds another save at its version):
-- its version is bumped past what it knows and everything up to it counts as known, so the
-- fence lets the copy replace Postgres's row (unless Postgres is ahead of even that).
-- KEYS[1] shard dirty zset   <prefix>:{sNNN}:dirty
-- KEYS[2] shard poison hash  <prefix>:{sNNN}:poison
-- KEYS[3] session hash       <prefix>:{sNNN}:session:<tenant>:<run>:<node>:<binding>:<agent>
-- ARGV[1] "1": keep this copy (take it over Postgres's); "": only retry
-- ARGV[2] the version Postgres holds: integer (the copy is bumped past it); "" if unknown
-- returns {0}  OK: out of the poison hash; dirty again (if the session still exists)
--         {4}  NOOP: the session is not in the poison hash; nothing written
local dirty, poison, session = KEYS[1], KEYS[2], KEYS[3]
local keep, postgres = ARGV[1] == '1', tonumber(ARGV[2] ~= '' and ARGV[2] or '0')
if redis.call('HEXISTS', poison, session) == 0 then
  return {4}
end
redis.call('HDEL', poison, session)
if redis.call('EXISTS', session) == 1 then
  if keep then
    local version = tonumber(redis.call('HGET', session, 'version') or '0')
    version = math.max(version, postgres) + 1
    redis.call('HSET', session, 'version', version, 'flushing_version', version - 1)
    redis.call('PERSIST', session)
  end
  redis.call('ZADD', dirty, 'NX', now_ms(), session)
end
return {0}
