#!lua
-- save: write a session, mark it active and dirty, bump its version by one.
-- A session already dirty is already persistent and in the dirty zset, and its owner's TTL was
-- renewed when it became dirty: those writes are skipped (a loop's case). The owner set's SADD
-- is not: a set evicted meanwhile (it has a TTL) is rebuilt by the next save.
-- The owner is a workflow run or a conversation: the same script serves both.
-- KEYS[1] session hash      <prefix>:{sNNN}:session:<tenant>:<run>:<node>:<binding>:<agent>
--                           or <prefix>:{sNNN}:conversation-session:<tenant>:<conversation>:
--                           <binding>:<agent>:<config>
-- KEYS[2] owner hash        <prefix>:{sNNN}:run:<tenant>:<run>
--                           or <prefix>:{sNNN}:conversation:<tenant>:<conversation>
-- KEYS[3] owner session set KEYS[2]..':sessions' (members: the last three parts of KEYS[1])
-- KEYS[4] shard dirty zset  <prefix>:{sNNN}:dirty
-- ARGV[1] expected version: integer, or "" for any version (0 = the session must not exist)
-- ARGV[2] dirty backlog bound of the shard: integer, 0 = unbounded
-- ARGV[3] content id of this save: text, a fresh random token the flush's fence compares
--         (also the lineage of a session this save creates)
-- ARGV[4] TTL of an open owner's hash and session set: integer milliseconds (sliding)
-- ARGV[5] when the owner hash is missing: "open" opens it, "" refuses (OWNER_UNKNOWN)
-- ARGV[6] owner hash field to set to ARGV[7] (a conversation's config:<binding>:<agent>,
--         which says which config snapshot the agent's session was last saved with); "" none
-- ARGV[7] its value: text
-- ARGV[8..] the values of the fields FIELDS names, in that order; "" deletes the field
-- Times (updated_at, created_at, opened_at, the dirty score) come from Redis's TIME. A new
-- session starts with flushing_version 0 (see mark_flushing).
-- returns {0, version}  OK: saved; version is the new version
--         {1}           OWNER_ENDED: the owner has ended; nothing written
--         {2, version}  VERSION_CONFLICT: the stored version is not ARGV[1]; nothing written
--         {3, backlog}  BACKLOG_FULL: the shard holds ARGV[2] dirty sessions; nothing written
--         {6}           OWNER_UNKNOWN: no owner hash (lost or evicted); ask Postgres;
--                       nothing written

local FIELDS = {'snapshot', 'layer_specs', 'app_id', 'workflow_id', 'node_execution_id',
                'agent_config_snapshot_id', 'backend_run_id', 'pending_form_id',
                'pending_tool_call_id'}
local session, owner, owner_sessions, dirty = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local expected, bound, content_id, owner_ttl = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local unknown_owner, owner_field, owner_value = ARGV[5], ARGV[6], ARGV[7]
local FIRST_FIELD = 7

local owner_state = redis.call('HGET', owner, 'state')
if owner_state == 'ended' then
  return {1}
end
if not owner_state and unknown_owner ~= 'open' then
  return {6}
end
local stored = redis.call('HMGET', session, 'version', 'status', 'lineage')
local version = tonumber(stored[1] or '0')
if expected ~= '' and tonumber(expected) ~= version then
  return {2, version}
end
local was_dirty = redis.call('ZSCORE', dirty, session)
if bound > 0 and not was_dirty then
  local backlog = redis.call('ZCARD', dirty)
  if backlog >= bound then
    return {3, backlog}
  end
end

version = version + 1
local now = now_ms()
local now_iso = iso_of(now)
local sets = {'updated_at', now_iso, 'version', version, 'content_id', content_id}
local dels = {}
if stored[2] ~= 'active' then
  sets[#sets + 1] = 'status'
  sets[#sets + 1] = 'active'
  if stored[2] then  -- a new life: nothing of the last retirement's cleanup carries over
    dels = {'cleaned_at', 'closed_by', 'cleanup_error', 'cleanup_run_id', 'cleanup_attempt',
            'run_ended'}
  end
end
if version == 1 then
  sets[#sets + 1] = 'created_at'
  sets[#sets + 1] = now_iso
  sets[#sets + 1] = 'flushing_version'
  sets[#sets + 1] = 0
end
if not stored[3] then
  sets[#sets + 1] = 'lineage'
  sets[#sets + 1] = content_id
end
for i, field in ipairs(FIELDS) do
  local value = ARGV[FIRST_FIELD + i]
  if value == '' then
    dels[#dels + 1] = field
  else
    sets[#sets + 1] = field
    sets[#sets + 1] = value
  end
end
if #dels > 0 then
  redis.call('HDEL', session, unpack(dels))
end
redis.call('HSET', session, unpack(sets))

if not was_dirty then
  redis.call('PERSIST', session)
  redis.call('ZADD', dirty, now, session)
end
local member = member_of(session)
if redis.call('SADD', owner_sessions, member) == 1 or not was_dirty then
  redis.call('PEXPIRE', owner_sessions, owner_ttl)
end
if not owner_state then
  redis.call('HSET', owner, 'state', 'open', 'opened_at', now_iso)
end
if owner_field ~= '' then
  redis.call('HSET', owner, owner_field, owner_value)
end
if not was_dirty or not owner_state then
  redis.call('PEXPIRE', owner, owner_ttl)
end
return {0, version}
