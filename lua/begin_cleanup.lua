#!lua
-- begin_cleanup: at workflow end, every active session of the run goes to cleaning.
-- KEYS[1] shard dirty zset  <prefix>:{sNNN}:dirty
-- KEYS[2] run session set   <prefix>:{sNNN}:run:<tenant>:<run>:sessions: every session that
--                           exists is (re-)added as <node>:<binding>:<agent>, so a set lost to
--                           eviction cannot let the run settle with a session left cleaning
-- KEYS[3..] session hashes of one run  <prefix>:{sNNN}:session:<tenant>:<run>:...
-- ARGV[1] now: ISO-8601 UTC text
-- ARGV[2] TTL of a clean, cleaned session of an ended run: integer milliseconds
-- returns {0, moved}  OK: moved = how many sessions went from active to cleaning
local dirty, run_sessions, now, ended_ttl = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
-- Every session of the run is marked run_ended=1, so a session retired earlier by a failed
-- backend run also gets the short TTL once it is clean.
local t = redis.call('TIME')
local now_ms = t[1] * 1000 + math.floor(t[2] / 1000)
local moved = 0
for i = 3, #KEYS do
  local session = KEYS[i]
  local stored = redis.call('HMGET', session, 'status', 'version', 'flushed_version')
  local status = stored[1]
  if status then
    redis.call('HSET', session, 'run_ended', '1')
    redis.call('SADD', run_sessions, session:sub(#run_sessions - 3))
  end
  if status == 'active' then
    redis.call('HSET', session, 'status', 'cleaning', 'updated_at', now,
               'closed_by', 'workflow_end')
    redis.call('HINCRBY', session, 'version', 1)
    redis.call('PERSIST', session)
    redis.call('ZADD', dirty, 'NX', now_ms, session)
    moved = moved + 1
  elseif status == 'cleaned' and stored[2] == stored[3] then
    redis.call('PEXPIRE', session, ended_ttl)
  end
end
return {0, moved}
