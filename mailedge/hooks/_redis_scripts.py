"""The Lua scripts behind :class:`mailedge.hooks.redis.RedisStore`: one atomic step per call.

Every record is a Redis string whose first byte names its kind, so a call on a key of another
kind starts from rest, as :class:`~mailedge.hooks.store.MemoryStore` does:

- ``g<TAT>``: a GCRA theoretical arrival time, in microseconds of the server's ``TIME``;
- ``h<t1>,<t2>,...``: a hit log, oldest first, in microseconds;
- ``t<version><TAB><value>``: a text record; ``version`` is the server's ``TIME`` in
  microseconds when it was written, so a local view can tell a newer write from an older one.

Times come from ``TIME`` inside the script, never from a caller, so hosts with different clocks
share one limit. Numbers leave Lua as integers or strings (Lua numbers become integer replies,
``1.7`` arrives as ``1``), so durations travel as whole microseconds or milliseconds. Every key
is written with ``PX``: nothing is left without a time to live.

A script that writes a mirrored key (a ban) also ``PUBLISH``es the change, inside the same
atomic step, as ``<kind>\\t<version>\\t<ttl ms>\\t<key>\\t<value>`` (kind ``s`` set, ``d``
delete), so every process's view sees changes in the order Redis made them.
"""

from __future__ import annotations

__all__ = ["BATCH", "DELETE", "GCRA", "GET", "HIT", "SET", "TIME"]

# Each script reads the server clock in microseconds as `now` and the write's version string.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local version = t[1] .. string.format('%06d', tonumber(t[2]))
"""

# KEYS[1]; ARGV: emission interval, burst tolerance (µs). Returns {allowed, retry after µs}.
GCRA = (
    _NOW
    + """
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = now
local old = redis.call('GET', KEYS[1])
if old and string.sub(old, 1, 1) == 'g' then
  local stored = tonumber(string.sub(old, 2))
  if stored and stored > now then tat = stored end
end
if tat - now > tolerance then
  return {0, string.format('%d', tat - tolerance - now)}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], 'g' .. string.format('%d', new_tat),
           'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
return {1, '0'}
"""
)

# KEYS[1]; ARGV: window (µs), limit. Returns how many hits the window holds, this one included.
HIT = (
    _NOW
    + """
local window = tonumber(ARGV[1])
local limit = math.max(tonumber(ARGV[2]), 1)
local kept = {}
local old = redis.call('GET', KEYS[1])
if old and string.sub(old, 1, 1) == 'h' then
  for item in string.gmatch(string.sub(old, 2), '[^,]+') do
    local at = tonumber(item)
    if at and at > now - window then kept[#kept + 1] = item end
  end
end
kept[#kept + 1] = string.format('%d', now)
while #kept > limit do table.remove(kept, 1) end
redis.call('SET', KEYS[1], 'h' .. table.concat(kept, ','),
           'PX', math.max(1, math.ceil(window / 1000)))
return #kept
"""
)

# KEYS[1]. Returns {value, ttl ms, version}, or nil when there is no text record.
GET = """
local old = redis.call('GET', KEYS[1])
if not old or string.sub(old, 1, 1) ~= 't' then return false end
local tab = string.find(old, '\\t', 2, true)
if not tab then return false end
return {string.sub(old, tab + 1), redis.call('PTTL', KEYS[1]), string.sub(old, 2, tab - 1)}
"""

# KEYS[1]; ARGV: value, ttl (ms, > 0), channel ('' for none), the caller's key.
# Returns the write's version.
SET = (
    _NOW
    + """
redis.call('SET', KEYS[1], 't' .. version .. '\\t' .. ARGV[1], 'PX', ARGV[2])
if ARGV[3] ~= '' then
  redis.call('PUBLISH', ARGV[3],
             's\\t' .. version .. '\\t' .. ARGV[2] .. '\\t' .. ARGV[4] .. '\\t' .. ARGV[1])
end
return version
"""
)

# KEYS[1]; ARGV: channel ('' for none), the caller's key. Returns {deleted (0/1), version}.
DELETE = (
    _NOW
    + """
local deleted = redis.call('DEL', KEYS[1])
if ARGV[1] ~= '' then
  redis.call('PUBLISH', ARGV[1], 'd\\t' .. version .. '\\t0\\t' .. ARGV[2] .. '\\t')
end
return {deleted, version}
"""
)

# No keys. The server's clock as a version string: where a full re-read of the view starts.
TIME = _NOW + "\nreturn version\n"

# Many decisions in one step, each on its own key (one client's key, in its hash tag):
# concurrent connections share one round trip. KEYS[i] is the i-th decision's key and
# ARGV[i] its operation and three arguments, comma-separated (unused ones empty): one
# argument per decision, because the client spends more on each argument than on its text.
#
# - 'g' interval, tolerance (µs), want: GCRA for up to `want` events at once (a lease): grants
#   as many as the burst still holds, at least one or none. Returns granted and the µs until
#   the bucket is full again; or 0 and the µs until one would be granted.
# - 'r' interval (µs), count: hand back `count` unspent granted events. Returns 0, 0.
# - 't' limit, member, lease (ms): take a connection slot if fewer than `limit` members are
#   live (each scored by when it expires). Returns 1 or 0, and 0.
# - 'n' lease (ms), member: renew a slot (re-adding one a restarted Redis lost). Returns 1, 0.
# - 'x' member: give a slot back. Returns 1 or 0 (was it there), and 0.
#
# The reply is flat: two integers per decision, in order.
BATCH = (
    _NOW
    + """
local now_ms = math.floor(now / 1000)
local out = {}
for i = 1, #KEYS do
  local key = KEYS[i]
  local op, a, b, c = string.match(ARGV[i], '^([^,]*),([^,]*),([^,]*),([^,]*)$')
  local first, second = 0, 0
  if op == 'g' or op == 'r' then
    local interval = tonumber(a)
    local tat = now
    local old = redis.call('GET', key)
    if old and string.sub(old, 1, 1) == 'g' then
      local stored = tonumber(string.sub(old, 2))
      if stored and stored > now then tat = stored end
    end
    local new_tat = nil
    if op == 'g' then
      local tolerance, want = tonumber(b), tonumber(c)
      local room = tolerance - (tat - now)
      if room < 0 then
        second = tat - tolerance - now
      else
        first = want
        if interval > 0 then first = math.min(want, math.floor(room / interval) + 1) end
        new_tat = tat + first * interval
        second = new_tat - now
      end
    elseif tat > now then
      new_tat = math.max(now, tat - tonumber(b) * interval)
    end
    if new_tat and new_tat > now then
      redis.call('SET', key, 'g' .. string.format('%d', new_tat),
                 'PX', math.max(1, math.ceil((new_tat - now) / 1000)))
    elseif new_tat then
      redis.call('DEL', key)
    end
  elseif op == 't' then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now_ms)
    if redis.call('ZCARD', key) < tonumber(a) then
      redis.call('ZADD', key, now_ms + tonumber(c), b)
      redis.call('PEXPIRE', key, tonumber(c))
      first = 1
    end
  elseif op == 'n' then
    redis.call('ZADD', key, now_ms + tonumber(a), b)
    redis.call('PEXPIRE', key, tonumber(a))
    first = 1
  elseif op == 'x' then
    first = redis.call('ZREM', key, b)
  end
  out[2 * i - 1] = first
  out[2 * i] = second
end
return out
"""
)
