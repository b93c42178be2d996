#!lua flags=allow-oom
-- mark_flushing: before a flush writes these sessions to Postgres, remember their versions.
-- allow-oom: it only sets one small field of hashes that exist, for a flush that frees memory.
-- Say, for each, the highest version this copy knows reached Postgres or was being written
-- there (max(flushed_version, flushing_version)), then remember the version about to be
-- written: a flush whose acknowledgement is lost (its worker killed) then never looks like a
-- Redis that went back in time, and a Redis restored from an older state does.
-- KEYS[1..] session hashes  <prefix>:{sNNN}:session:... (or ...:conversation-session:...)
-- ARGV[1..] the version read of KEYS[1..], in the same order: integers
-- returns {0, known...}  OK: per session the version known before this call; -1 for a
--                        session saved by an earlier build (no flushing_version: not
--                        checked), and -2 for one gone or saved again since it was read
--                        (not written by this flush: it stays dirty for the next)
local known = {0}
for i = 1, #KEYS do
  local session, read = KEYS[i], tonumber(ARGV[i])
  local stored = redis.call('HMGET', session, 'version', 'flushed_version', 'flushing_version')
  if tonumber(stored[1] or '-1') ~= read then
    known[#known + 1] = -2
  elseif not stored[3] then
    redis.call('HSET', session, 'flushing_version', read)
    known[#known + 1] = -1
  else
    local flushing = tonumber(stored[3])
    known[#known + 1] = math.max(tonumber(stored[2] or '0'), flushing)
    if read > flushing then
      redis.call('HSET', session, 'flushing_version', read)
    end
  end
end
return known
