#!lua flags=allow-oom
-- begin_flush: take a shard's flush lock and list what to flush, in one round trip.
-- allow-oom: a flush shrinks the backlog, so it must run when Redis is over maxmemory.
-- KEYS[1] flush lock        <prefix>:{sNNN}:flush_lock
-- KEYS[2] shard dirty zset  <prefix>:{sNNN}:dirty
-- ARGV[1] holder token: text (host:pid:random), stored as the lock's value
-- ARGV[2] lock lifetime: integer milliseconds from now
-- ARGV[3] delay: integer milliseconds; only entries first dirty at least this long ago
-- ARGV[4] limit: integer, most entries listed
-- returns {0, name, first_dirty_ms, ...}  OK: the token holds the lock; the entries, oldest
--                                         first (first_dirty_ms: integer milliseconds)
--         {4}  NOOP: another holder has the lock; nothing written
local lock, dirty = KEYS[1], KEYS[2]
local token, ttl, delay, limit = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local holder = redis.call('GET', lock)
if holder and holder ~= token then
  return {4}
end
redis.call('SET', lock, token, 'PX', ttl)
local cutoff = now_ms() - delay
local entries = redis.call('ZRANGEBYSCORE', dirty, '-inf', cutoff, 'WITHSCORES', 'LIMIT', 0, limit)
local reply = {0}
for i = 1, #entries, 2 do
  reply[#reply + 1] = entries[i]
  reply[#reply + 1] = tonumber(entries[i + 1])
end
return reply
