#!lua
-- retire: a failed or cancelled backend run makes an active session unresumable.
-- KEYS[1] session hash      <prefix>:{sNNN}:session:<tenant>:<run>:<node>:<binding>:<agent>
-- KEYS[2] shard dirty zset  <prefix>:{sNNN}:dirty
-- ARGV[1] failed backend run id: text, or "" to keep the stored backend_run_id
-- ARGV[2] now: ISO-8601 UTC text
-- returns {0, version}  OK: active -> cleaned; version is the new version
--         {4}           NOOP: the session is missing or not active; nothing written
local session, dirty = KEYS[1], KEYS[2]
local failed_run, now = ARGV[1], ARGV[2]

if redis.call('HGET', session, 'status') ~= 'active' then
  return {4}
end
local sets = {'status', 'cleaned', 'cleaned_at', now, 'updated_at', now,
              'closed_by', 'backend_failure'}
if failed_run ~= '' then
  sets[#sets + 1] = 'backend_run_id'
  sets[#sets + 1] = failed_run
end
redis.call('HSET', session, unpack(sets))
redis.call('HDEL', session, 'pending_form_id', 'pending_tool_call_id')
local version = redis.call('HINCRBY', session, 'version', 1)
redis.call('PERSIST', session)
local t = redis.call('TIME')
redis.call('ZADD', dirty, 'NX', t[1] * 1000 + math.floor(t[2] / 1000), session)
return {0, version}
