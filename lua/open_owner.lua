#!lua
-- open_owner: an owner Postgres does not know as ended: mark it open if Redis has no mark.
-- KEYS[1] owner hash        <prefix>:{sNNN}:run:<tenant>:<run>
--                           or <prefix>:{sNNN}:conversation:<tenant>:<conversation>
-- ARGV[1] TTL of an open owner's hash: integer milliseconds (opened_at is Redis's TIME)
-- returns {0}  OK: marked open
--         {5}  EXISTS: the owner hash is there (open or ended); nothing written
local owner, ttl = KEYS[1], ARGV[1]
if redis.call('EXISTS', owner) == 1 then
  return {5}
end
redis.call('HSET', owner, 'state', 'open', 'opened_at', iso_of(now_ms()))
redis.call('PEXPIRE', owner, ttl)
return {0}
