#!lua
-- settle_owner: every session of an ended owner is cleaned; its markers may now expire.
-- KEYS[1] owner hash        <prefix>:{sNNN}:run:<tenant>:<run>
--                           or <prefix>:{sNNN}:conversation:<tenant>:<conversation>
-- KEYS[2] owner session set KEYS[1]..':sessions'
-- ARGV[1] TTL of the settled owner's hash and session set: integer milliseconds
-- returns {0}  OK: the TTLs are set
--         {4}  NOOP: the owner is not ended here; nothing written
local owner, owner_sessions, ttl = KEYS[1], KEYS[2], ARGV[1]
if redis.call('HGET', owner, 'state') ~= 'ended' then
  return {4}
end
redis.call('HSET', owner, 'settled', '1')
redis.call('PEXPIRE', owner, ttl)
redis.call('PEXPIRE', owner_sessions, ttl)
return {0}
