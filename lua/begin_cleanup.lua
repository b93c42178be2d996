#!lua
-- begin_cleanup: every active session given goes to cleaning (its owner ended, or a
-- conversation's session was retired: another config, or idle).
-- KEYS[1] shard dirty zset  <prefix>:{sNNN}:dirty
-- KEYS[2] owner session set <prefix>:{sNNN}:run:<tenant>:<run>:sessions or
--                           <prefix>:{sNNN}:conversation:<tenant>:<conversation>:sessions:
--                           every session that exists is (re-)added (the last three parts of
--                           its name), so a set lost to eviction cannot let the owner settle
--                           with a session left cleaning
-- KEYS[3..] session hashes of that owner
-- ARGV[1] TTL of a clean, cleaned session of an ended owner: integer milliseconds
-- ARGV[2] closed_by: text (workflow_end, conversation_end, config_change, idle)
-- ARGV[3] "1": the owner ended (every session given is marked run_ended=1, so a session
--         retired earlier by a failed backend run also gets the short TTL once it is clean);
--         "": it did not (only these sessions are retired)
-- ARGV[4] idle time: integer milliseconds: only an active session last saved at least that
--         long ago by Redis's clock, and not waiting for human input (no pending_form_id /
--         pending_tool_call_id), is moved; "" = every active session
-- returns {0, moved}  OK: moved = how many sessions went from active to cleaning

local dirty, owner_sessions, ended_ttl = KEYS[1], KEYS[2], ARGV[1]
local closed_by, owner_ended = ARGV[2], ARGV[3] == '1'
local now = now_ms()
local now_iso = iso_of(now)
local idle_cutoff = ''
if ARGV[4] ~= '' then
  idle_cutoff = iso_of(now - tonumber(ARGV[4]))
end
local moved = 0
for i = 3, #KEYS do
  local session = KEYS[i]
  local stored = redis.call('HMGET', session, 'status', 'version', 'flushed_version',
                            'updated_at', 'pending_form_id', 'pending_tool_call_id')
  local status = stored[1]
  if status == 'active' and idle_cutoff ~= '' and
     ((stored[4] or '') > idle_cutoff or stored[5] or stored[6]) then
    status = 'busy'  -- saved since the cutoff, or waiting for a human: not idle
  end
  if status then
    if owner_ended then
      redis.call('HSET', session, 'run_ended', '1')
    end
    redis.call('SADD', owner_sessions, member_of(session))
  end
  if status == 'active' then
    redis.call('HSET', session, 'status', 'cleaning', 'updated_at', now_iso,
               'closed_by', closed_by)
    redis.call('HINCRBY', session, 'version', 1)
    redis.call('PERSIST', session)
    redis.call('ZADD', dirty, 'NX', now, session)
    moved = moved + 1
  elseif owner_ended and status == 'cleaned' and stored[2] == stored[3] then
    redis.call('PEXPIRE', session, ended_ttl)
  end
end
return {0, moved}
