"""Every Lua script of the Redis store, each with its KEYS/ARGV contract.

A fencing token is granted by `NEXT_TOKEN` (the lease's acquire, `new_fence`)
and checked by `FENCED` at the start of every owner write, in the same script
as the write, so no stale owner's write can slip in between check and write.
A refused write is an error reply starting with `FENCED_REPLY`, which the
store turns into NotOwner.

Scripts that read the outbox share `STREAMS` (the XREADGROUP reply shape and
entry fields) and `TAKE_OVER` (moving former owners' pending entries to the
current consumer), so that logic is written once.
"""

from __future__ import annotations

FENCED_REPLY = "FENCED"
"""The error reply prefix of a refused write (mapped to NotOwner by the store)."""

#: next_token(fence_key): INCR, raised to Redis's clock in ms, so tokens keep
#: growing even after a Redis without persistence restarted empty.
NEXT_TOKEN = """
local function next_token(key)
  local t = redis.call('INCR', key)
  local now = redis.call('TIME')
  local ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
  if t < ms then
    t = ms
    redis.call('SET', key, string.format('%d', t))
  end
  return string.format('%d', t)
end
"""

#: fenced(fence_key, token): true when `token` is given ('' is an unfenced,
#: non-owner write) and is not the session's current one.
FENCED = """
local function fenced(key, token)
  return token ~= '' and redis.call('GET', key) ~= token
end
local function refuse(token)
  return redis.error_reply('FENCED fencing token ' .. token .. ' is stale')
end
"""


def fence_arg(fence: int | None) -> str:
    """The script argument for a fencing token: '' for an unfenced (non-owner) write."""
    return "" if fence is None else str(fence)


#: group_read(key, group, consumer, count, from): the XREADGROUP rows
#: ({id, fields or false}; false once deleted after it was read), {} when none.
#: field(fields, name): one field of a flat field list, nil when absent.
STREAMS = """
local function group_read(key, group, consumer, count, from)
  local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', count,
    'STREAMS', key, from)
  if reply then return reply[1][2] end
  return {}
end
local function field(f, name)
  for i = 1, #f, 2 do
    if f[i] == name then return f[i + 1] end
  end
  return nil
end
"""

#: take_over(key, group, consumer): moves every entry other consumers (former
#: owners) read and never acked to this consumer, in bounded steps; returns how
#: many this consumer now holds unacked.
TAKE_OVER = """
local function take_over(key, group, consumer)
  local summary = redis.call('XPENDING', key, group)
  local others = false
  for _, row in ipairs(summary[4] or {}) do
    if row[1] ~= consumer then others = true end
  end
  if others then
    local cursor = '0-0'
    for _ = 1, 100 do
      local reply = redis.call('XAUTOCLAIM', key, group, consumer, 0, cursor, 'COUNT', 1000,
        'JUSTID')
      cursor = reply[1]
      if cursor == '0-0' then break end
    end
  end
  for _, row in ipairs(redis.call('XPENDING', key, group)[4] or {}) do
    if row[1] == consumer then return tonumber(row[2]) end
  end
  return 0
end
"""

# KEYS: outbox stream, ids hash, seq counter, fence
# ARGV: at, max_depth, idem key prefix, result key prefix, ttl_ms, ack channel, group,
#       consumer, claim (0/1), number of acks, fencing token ('' unfenced), the acked
#       message ids, then per new message: message_id, to, body, idempotency_key,
#       content ('' for plain text; else kept in the entry, and after the ack under
#       the result key + ':content' for the retention, for sent_message)
# Returns {acked, accepted, claimed, unread}: per ack its result time; per new message
# {'new', record}, {'dup', record, result or false} or {'full', depth}; with claim, the
# field lists of the entries read for the caller, and 1 if unread entries remain.
# Idem and result keys are built from prefixes that carry the session's hash tag (the
# idem key is named in the outbox entry), so they share the declared keys' slot.
APPLY_OUTBOX = FENCED + STREAMS + """
if fenced(KEYS[4], ARGV[11]) then return refuse(ARGV[11]) end
local at, ttl = ARGV[1], ARGV[5]
if ARGV[9] == '1' then  -- the read below must not fail after the writes: no rollback
  redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[7], '0', 'MKSTREAM')
end
local acked = {}
local n_acks = tonumber(ARGV[10])
for n = 12, 11 + n_acks do
  local mid = ARGV[n]
  local result_key = ARGV[4] .. mid
  local done = redis.call('GET', result_key)
  if done then
    acked[#acked + 1] = done
  else
    local entry = redis.call('HGET', KEYS[2], mid)
    if entry then
      local rows = redis.call('XRANGE', KEYS[1], entry, entry)
      if rows[1] then
        local key = field(rows[1][2], 'key')
        if key then
          redis.call('PEXPIRE', ARGV[3] .. key, ttl)
          redis.call('SET', result_key .. ':key', key, 'PX', ttl)  -- for sent_message
        end
        local content = field(rows[1][2], 'content')
        if content then redis.call('SET', result_key .. ':content', content, 'PX', ttl) end
      end
      redis.call('XACK', KEYS[1], ARGV[7], entry)
      redis.call('XDEL', KEYS[1], entry)
      redis.call('HDEL', KEYS[2], mid)
      redis.call('SET', result_key, at, 'PX', ttl)
      redis.call('PUBLISH', ARGV[6], mid .. ' ' .. at)
    end
    acked[#acked + 1] = at
  end
end
local accepted, fresh, last_added = {}, 0, nil
local depth = redis.call('XLEN', KEYS[1])
local max_depth = tonumber(ARGV[2])
for n = 12 + n_acks, #ARGV, 5 do
  local mid, to, body, key, content = ARGV[n], ARGV[n + 1], ARGV[n + 2], ARGV[n + 3],
    ARGV[n + 4]
  local idem = ARGV[3] .. key
  local known = redis.call('GET', idem)
  if known then
    -- rewritten as is: a propagated write, so a WAIT after this script also covers
    -- the record (accepted earlier, maybe on another connection)
    redis.call('SET', idem, known, 'KEEPTTL')
    local known_mid = cjson.decode(known)[1]
    accepted[#accepted + 1] = {'dup', known, redis.call('GET', ARGV[4] .. known_mid)}
  elseif depth >= max_depth then
    accepted[#accepted + 1] = {'full', tostring(depth)}
  else
    local seq = tostring(redis.call('INCR', KEYS[3]))
    if content == '' then
      last_added = redis.call('XADD', KEYS[1], '*', 'mid', mid, 'to', to, 'body', body,
        'key', key, 'seq', seq, 'at', at)
    else
      last_added = redis.call('XADD', KEYS[1], '*', 'mid', mid, 'to', to, 'body', body,
        'key', key, 'seq', seq, 'at', at, 'content', content)
    end
    redis.call('HSET', KEYS[2], mid, last_added)
    local record = cjson.encode({mid, to, body, seq, at})
    redis.call('SET', idem, record)
    depth, fresh = depth + 1, fresh + 1
    accepted[#accepted + 1] = {'new', record}
  end
end
local claimed, unread = {}, 0
if ARGV[9] == '1' and fresh > 0 then
  local last_read = nil
  for _, row in ipairs(group_read(KEYS[1], ARGV[7], ARGV[8], fresh, '>')) do
    last_read = row[1]
    if row[2] then claimed[#claimed + 1] = row[2] end
  end
  if last_read ~= last_added then unread = 1 end
end
return {acked, accepted, claimed, unread}
"""

# KEYS: outbox stream, fence.  ARGV: group, consumer, token
# Takes over former owners' unacked entries; returns how many this consumer holds.
CLAIM_OUTBOX = FENCED + TAKE_OVER + """
if fenced(KEYS[2], ARGV[3]) then return refuse(ARGV[3]) end
return take_over(KEYS[1], ARGV[1], ARGV[2])
"""

# KEYS: outbox stream, fence.  ARGV: group, consumer, limit, after_sequence, token
# Former owners' unacked entries are taken over first, then the owner's own pending
# list (older than anything new), then new entries; of that window only the messages
# numbered after `after_sequence` are returned, so a delivery loop with the rest in
# flight does not read their bodies again.
PENDING = FENCED + STREAMS + TAKE_OVER + """
if fenced(KEYS[2], ARGV[5]) then return refuse(ARGV[5]) end
take_over(KEYS[1], ARGV[1], ARGV[2])
local limit, after = tonumber(ARGV[3]), tonumber(ARGV[4])
local out, seen = {}, 0
local function take(rows)
  for _, row in ipairs(rows) do
    local f = row[2]
    if f then  -- false: deleted after it was read, so already acked
      seen = seen + 1
      local seq = field(f, 'seq')
      if seq and tonumber(seq) > after then out[#out + 1] = f end
    end
  end
end
take(group_read(KEYS[1], ARGV[1], ARGV[2], limit, '0'))
if seen < limit then
  take(group_read(KEYS[1], ARGV[1], ARGV[2], limit - seen, '>'))
end
return out
"""

# KEYS: session hash.  ARGV: tenant, enabled, created_at
# Returns the existing record's fields, or false when this call created it.
CREATE_SESSION = """
if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('HGETALL', KEYS[1]) end
redis.call('HSET', KEYS[1], 'tenant', ARGV[1], 'enabled', ARGV[2], 'created_at', ARGV[3])
return false
"""

# KEYS: session hash.  ARGV: enabled.  A no-op for an unknown session.
SET_ENABLED = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'enabled', ARGV[1]) end
return 0
"""

# KEYS: event log, last-event hash, fence.  ARGV: token, event json, log size, ttl_ms (0: none)
# The log entry and the session's last event are written together, fenced: a former
# owner's late event can neither enter the log nor replace its successor's state.
APPEND_EVENT = FENCED + """
if fenced(KEYS[3], ARGV[1]) then return refuse(ARGV[1]) end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'e', ARGV[2])
redis.call('HSET', KEYS[2], 'id', id, 'event', ARGV[2])
if tonumber(ARGV[4]) > 0 then redis.call('PEXPIRE', KEYS[2], ARGV[4]) end
return id
"""

# KEYS: last-event hash, fence.  ARGV: token, event json, sequence, ttl_ms (0: none)
# The sharded log's first step (Redis Cluster: the log shard is in another slot): the
# session's last event, fenced, its id cleared until LAST_EVENT_ID names its log entry.
LAST_EVENT = FENCED + """
if fenced(KEYS[2], ARGV[1]) then return refuse(ARGV[1]) end
redis.call('HSET', KEYS[1], 'id', '', 'event', ARGV[2], 'seq', ARGV[3])
if tonumber(ARGV[4]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[4]) end
return 1
"""

# KEYS: last-event hash.  ARGV: sequence, log entry id
# The sharded log's last step: names the entry, unless a newer event replaced it meanwhile.
LAST_EVENT_ID = """
if redis.call('HGET', KEYS[1], 'seq') == ARGV[1] then redis.call('HSET', KEYS[1], 'id', ARGV[2]) end
return 1
"""

# KEYS: live hash, fence.  ARGV: token, ttl_ms, then field/value pairs
REPORT_LIVE = FENCED + """
if fenced(KEYS[2], ARGV[1]) then return refuse(ARGV[1]) end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: credentials, fence.  ARGV: token, sealed credentials ('' and no 3rd arg: delete)
SET_CREDENTIALS = FENCED + """
if fenced(KEYS[2], ARGV[1]) then return refuse(ARGV[1]) end
if ARGV[2] then redis.call('SET', KEYS[1], ARGV[2]) else redis.call('DEL', KEYS[1]) end
return 1
"""

# KEYS: kv hash, fence.  ARGV: token, number of values to set n, n name/sealed pairs,
# then the names to delete.  All of one call in one write, fenced.
KV_SET = FENCED + """
if fenced(KEYS[2], ARGV[1]) then return refuse(ARGV[1]) end
local last_set = 2 + 2 * tonumber(ARGV[2])
for i = 3, last_set, 1000 do  -- in steps, within Lua's bound on unpacked values
  redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + 999, last_set)))
end
for i = last_set + 1, #ARGV, 1000 do
  redis.call('HDEL', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
return 1
"""

# KEYS: kv hash, fence.  ARGV: token.  Deletes the whole area, fenced.
KV_CLEAR = FENCED + """
if fenced(KEYS[2], ARGV[1]) then return refuse(ARGV[1]) end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: fence.  Grants the next token.
NEW_FENCE = NEXT_TOKEN + """
return next_token(KEYS[1])
"""

# KEYS: inbound stream, seen hash, aged sorted set, fence.
# ARGV: upstream id, sender, body, at, retention (ms; 0: keep everything), token
# Returns the new entry id, or false when the upstream id is already stored.
# Ages come from the stream's entry ids, Redis's clock, whoever's broker adds.
ADD_INBOUND = FENCED + """
if fenced(KEYS[4], ARGV[6]) then return refuse(ARGV[6]) end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return false end
local entry = redis.call('XADD', KEYS[1], '*', 'uid', ARGV[1], 'from', ARGV[2], 'body', ARGV[3],
  'at', ARGV[4])
redis.call('HSET', KEYS[2], ARGV[1], entry)
local retention = tonumber(ARGV[5])
if retention > 0 then
  local now = tonumber(string.match(entry, '^(%d+)'))
  local cutoff = now - retention
  redis.call('ZADD', KEYS[3], now, ARGV[1])
  redis.call('XTRIM', KEYS[1], 'MINID', cutoff)
  local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. cutoff, 'LIMIT', 0, 256)
  if #old > 0 then
    redis.call('HDEL', KEYS[2], unpack(old))
    redis.call('ZREM', KEYS[3], unpack(old))
  end
end
return entry
"""
