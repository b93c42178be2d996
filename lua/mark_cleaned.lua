#!lua
-- mark_cleaned: the backend cleanup of a cleaning session has ended (or given up).
-- KEYS[1] session hash      <prefix>:{sNNN}:session:<tenant>:<run>:<node>:<binding>:<agent>
-- KEYS[2] shard dirty zset  <prefix>:{sNNN}:dirty
-- ARGV[1] cleanup backend run id: text, or "" to keep the stored backend_run_id
-- ARGV[2] error that ended the attempts: text, or "" when cleanup succeeded
-- returns {0, version}  OK: cleaning -> cleaned; version is the new version
--         {4}           NOOP: the session is missing or not cleaning; nothing written
local session, dirty = KEYS[1], KEYS[2]
local cleanup_run, err = ARGV[1], ARGV[2]

if redis.call('HGET', session, 'status') ~= 'cleaning' then
  return {4}
end
local now = now_ms()
local now_iso = iso_of(now)
local sets = {'status', 'cleaned', 'cleaned_at', now_iso, 'updated_at', now_iso}
if cleanup_run ~= '' then
  sets[#sets + 1] = 'backend_run_id'
  sets[#sets + 1] = cleanup_run
end
if err ~= '' then
  sets[#sets + 1] = 'cleanup_error'
  sets[#sets + 1] = err
end
redis.call('HSET', session, unpack(sets))
redis.call('HDEL', session, 'pending_form_id', 'pending_tool_call_id', 'cleanup_run_id',
           'cleanup_attempt')
local version = redis.call('HINCRBY', session, 'version', 1)
redis.call('PERSIST', session)
redis.call('ZADD', dirty, 'NX', now, session)
return {0, version}
