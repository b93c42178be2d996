#!lua flags=allow-oom
-- retry_poisoned: an operator sends a parked session back to the flush (after fixing why).
-- allow-oom: it moves a session from the poison hash back to the backlog; it grows nothing.
-- KEYS[1] shard dirty zset   <prefix>:{sNNN}:dirty
-- KEYS[2] shard poison hash  <prefix>:{sNNN}:poison
-- KEYS[3] session hash       <prefix>:{sNNN}:session:<tenant>:<run>:<node>:<binding>:<agent>
-- returns {0}  OK: out of the poison hash; dirty again (if the session still exists)
--         {4}  NOOP: the session is not in the poison hash; nothing written
local dirty, poison, session = KEYS[1], KEYS[2], KEYS[3]
if redis.call('HEXISTS', poison, session) == 0 then
  return {4}
end
redis.call('HDEL', poison, session)
if redis.call('EXISTS', session) == 1 then
  local t = redis.call('TIME')
  redis.call('ZADD', dirty, 'NX', t[1] * 1000 + math.floor(t[2] / 1000), session)
end
return {0}
