#!lua
-- retire: a failed or cancelled backend run makes an active session unresumable.
-- While its owner is open the session is cleaned at once (the failed run left nothing to
-- clean up on the backend); once the owner has ended it goes to cleaning instead, marked
-- run_ended, so that the owner's reconciler has the backend delete its layers.
-- KEYS[1] session hash      <prefix>:{sNNN}:session:<tenant>:<run>:<node>:<binding>:<agent>
--                           (or a conversation's: ...:conversation-session:...)
-- KEYS[2] shard dirty zset  <prefix>:{sNNN}:dirty
-- KEYS[3] owner hash        <prefix>:{sNNN}:run:<tenant>:<run> (or ...:conversation:...)
-- ARGV[1] failed backend run id: text, or "" to keep the stored backend_run_id
-- returns {0, version, status}  OK: active -> status (cleaned, or cleaning in an ended owner)
--         {4}                   NOOP: the session is missing or not active; nothing written
--         {6}                   OWNER_UNKNOWN: no owner hash (lost or evicted); ask Postgres
local session, dirty, owner = KEYS[1], KEYS[2], KEYS[3]
local failed_run = ARGV[1]

if redis.call('HGET', session, 'status') ~= 'active' then
  return {4}
end
local state = redis.call('HGET', owner, 'state')
if not state then
  return {6}
end
local now = now_ms()
local sets = {'updated_at', iso_of(now), 'closed_by', 'backend_failure'}
local status = 'cleaned'
if state == 'ended' then
  status = 'cleaning'
  sets[#sets + 1] = 'run_ended'
  sets[#sets + 1] = '1'
else
  sets[#sets + 1] = 'cleaned_at'
  sets[#sets + 1] = sets[2]
end
sets[#sets + 1] = 'status'
sets[#sets + 1] = status
if failed_run ~= '' then
  sets[#sets + 1] = 'backend_run_id'
  sets[#sets + 1] = failed_run
end
redis.call('HSET', session, unpack(sets))
redis.call('HDEL', session, 'pending_form_id', 'pending_tool_call_id')
local version = redis.call('HINCRBY', session, 'version', 1)
redis.call('PERSIST', session)
redis.call('ZADD', dirty, 'NX', now, session)
return {0, version, status}
