-- quarantine: Postgres refused a flushed session; park it in the poison hash with the reason.
-- KEYS[1] shard dirty zset   <prefix>:{sNNN}:dirty
-- KEYS[2] shard poison hash  <prefix>:{sNNN}:poison
-- KEYS[3] session hash       <prefix>:{sNNN}:session:<tenant>:<run>:<node>:<binding>:<agent>
-- ARGV[1] the version Postgres refused: integer
-- ARGV[2] why: text
-- returns {0}  OK: recorded; the dirty mark is gone unless the session moved on meanwhile
--              (a newer version stays dirty and is tried again)
local dirty, poison, session = KEYS[1], KEYS[2], KEYS[3]
local refused, reason = tonumber(ARGV[1]), ARGV[2]
redis.call('HSET', poison, session, 'v' .. refused .. ': ' .. reason)
local version = tonumber(redis.call('HGET', session, 'version') or '0')
if version == refused then
  redis.call('ZREM', dirty, session)
end
return {0}
