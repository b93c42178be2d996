#!lua flags=allow-oom
-- drop_poisoned: an operator gives up a parked session's Redis copy; Postgres's copy wins.
-- allow-oom: it only deletes.
-- KEYS[1] shard dirty zset   <prefix>:{sNNN}:dirty
-- KEYS[2] shard poison hash  <prefix>:{sNNN}:poison
-- KEYS[3] session hash       <prefix>:{sNNN}:session:<tenant>:<run>:<node>:<binding>:<agent>
-- KEYS[4] owner session set  <prefix>:{sNNN}:run:<tenant>:<run>:sessions or
--                            ...:conversation:<tenant>:<conversation>:sessions (members: the
--                            last three parts of KEYS[3]; sets written before short members
--                            hold the full session name: both forms are removed)
-- returns {0}  OK: the session hash, its dirty mark and its poison entry are gone
--         {4}  NOOP: the session is not in the poison hash; nothing written

local dirty, poison, session, owner_sessions = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
if redis.call('HEXISTS', poison, session) == 0 then
  return {4}
end
redis.call('DEL', session)
redis.call('ZREM', dirty, session)
redis.call('HDEL', poison, session)
redis.call('SREM', owner_sessions, member_of(session), session)
return {0}
