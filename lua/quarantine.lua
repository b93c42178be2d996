#!lua flags=allow-oom
-- quarantine: Postgres refused a flushed session; park it in the poison hash with the reason.
-- allow-oom: parking a refused session shrinks the backlog.
-- KEYS[1] shard dirty zset   <prefix>:{sNNN}:dirty
-- KEYS[2] shard poison hash  <prefix>:{sNNN}:poison
-- KEYS[3] session hash       <prefix>:{sNNN}:session:<tenant>:<run>:<node>:<binding>:<agent>
-- ARGV[1] the version Postgres refused: integer
-- ARGV[2] why: text
-- ARGV[3] force: "1" parks it whatever its version (a value that cannot be decoded), else ""
-- returns {0}  OK: parked; the dirty mark is gone
--         {4}  NOOP: the session moved on to another version meanwhile; it stays dirty and
--              the next flush tries the new version
local dirty, poison, session = KEYS[1], KEYS[2], KEYS[3]
local refused, reason, force = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local version = tonumber(redis.call('HGET', session, 'version') or '0')
if force ~= '1' and version ~= refused then
  return {4}
end
redis.call('HSET', poison, session, 'v' .. refused .. ': ' .. reason)
redis.call('ZREM', dirty, session)
return {0}
