-- prelude: helpers every script may call. The loader (cache.scripts.source) puts them on
-- each script's second line, right after its shebang, joined into one line, so the line
-- numbers Redis reports in errors are the script file's own.
-- Rules that joining needs: each statement of this file starts and ends on its own lines,
-- comments take whole lines, and no string holds two dashes.

-- A session's member of its owner's set: the name after its fifth ':' (the key prefix
-- and the {sNNN} tag hold none, and IDs are percent-encoded), i.e. its last three parts.
local function member_of(name)
  local at = 0
  for _ = 1, 5 do
    at = name:find(':', at + 1, true)
  end
  return name:sub(at + 1)
end

-- Redis's own clock, the one clock every stored time comes from: milliseconds since 1970.
local function now_ms()
  local t = redis.call('TIME')
  return t[1] * 1000 + math.floor(t[2] / 1000)
end

-- ms as ISO-8601 UTC text with milliseconds, as Python's isoformat(timespec='milliseconds')
-- writes it (so the text sorts as the time does). Days to a civil date: H. Hinnant's
-- days_from_civil, inverted.
local function iso_of(ms)
  local secs = math.floor(ms / 1000)
  local days = math.floor(secs / 86400)
  local sod = secs - days * 86400
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
                          - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local day = doy - math.floor((153 * mp + 2) / 5) + 1
  local month = mp < 10 and mp + 3 or mp - 9
  local year = yoe + era * 400 + (month <= 2 and 1 or 0)
  return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%03d+00:00', year, month, day,
                       math.floor(sod / 3600), math.floor(sod % 3600 / 60), sod % 60, ms % 1000)
end

-- Give a lock up if token still holds it, and wake one holder-to-be waiting for it (BLPOP
-- on the lock's free list, which holds at most one token, for a second); free may be nil
-- (a cleanup lease: nobody waits for it). 1 if released.
local function give_up_lock(lock, free, token)
  if token == '' or redis.call('GET', lock) ~= token then
    return 0
  end
  redis.call('DEL', lock)
  if free then
    redis.call('DEL', free)
    redis.call('RPUSH', free, '1')
    redis.call('PEXPIRE', free, 1000)
  end
  return 1
end
