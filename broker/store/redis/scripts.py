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


#: in_steps(head, list): redis.call(head..., list...) for a list of any length, in
#: steps within Lua's bound on unpacked values (1,000: even, for field/value pairs):
#: one variadic command for a batch instead of one per item.
IN_STEPS = """
local function in_steps(head, list)
  for i = 1, #list, 1000 do
    local args = {unpack(head)}
    for j = i, math.min(i + 999, #list) do args[#args + 1] = list[j] end
    redis.call(unpack(args))
  end
end
"""

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

# KEYS: outbox stream, ids hash, seq counter, fence; then per ack its result, its result's
#       key record, its idempotency record (keyed message) or sent record (unkeyed), and
#       its content record; then per new message with a key its idempotency record.
# ARGV: at, max_depth, (unused), (unused), ttl_ms, ack channel, group, consumer,
#       claim (0/1), number of acks, fencing token ('' unfenced), per ack: message id and
#       idempotency key ('' none), then per new message: message_id, to, body,
#       idempotency_key ('' none: the client gave none, so no record is kept for it),
#       content ('' for plain text; else kept in the entry, and after the ack in the
#       content record for the retention, for sent_message)
# Returns {acked, accepted, claimed, unread}: per ack its result time; per new message
# {'new', record}, {'dup', record} or {'full', depth}; with claim, the field lists of the
# entries read for the caller, and 1 if unread entries remain. An ack whose declared key
# is not its entry's is refused before any write ('ACKKEYS'): the caller looks it up.
# Every key touched is declared (Redis Cluster checks them, and a slot migration answers
# TRYAGAIN before the script runs rather than half-way through it).
APPLY_OUTBOX = FENCED + STREAMS + IN_STEPS + """
if fenced(KEYS[4], ARGV[11]) then return refuse(ARGV[11]) end
local at, ttl = ARGV[1], ARGV[5]
local n_acks = tonumber(ARGV[10])
local first_new = 12 + 2 * n_acks
local ack_keys, k = {}, 5  -- per ack: result, key record, idem or sent record, content
for n = 12, first_new - 1, 2 do
  -- an ack names the message id; a refusal "<id>", a newline, "<code> <reason>"
  local mid, value = ARGV[n], at
  local cut = string.find(mid, '\\n', 1, true)
  if cut then
    value = at .. ' ' .. string.sub(mid, cut + 1)
    mid = string.sub(mid, 1, cut - 1)
  end
  ack_keys[#ack_keys + 1] = {KEYS[k], KEYS[k + 1], KEYS[k + 2], mid, ARGV[n + 1], value,
    KEYS[k + 3]}
  k = k + 4
end
local entries, earlier = {}, {}
for i, a in ipairs(ack_keys) do  -- checked before any write: a script has no rollback
  earlier[i] = redis.call('GET', a[1])
  if not earlier[i] then
    local entry = redis.call('HGET', KEYS[2], a[4])
    if entry then
      local rows = redis.call('XRANGE', KEYS[1], entry, entry)
      if rows[1] then
        if (field(rows[1][2], 'key') or '') ~= a[5] then
          return redis.error_reply('ACKKEYS message ' .. a[4] .. ' has another key')
        end
        entries[i] = {entry, rows[1][2]}
      else
        entries[i] = {entry, false}
      end
    end
  end
end
if ARGV[9] == '1' then  -- the read below must not fail after the writes: no rollback
  redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[7], '0', 'MKSTREAM')
end
-- settled: results written by this batch (an id acked twice keeps its first);
-- the entries leave the stream and the ids hash in one command each
local acked, settled, gone, gone_ids = {}, {}, {}, {}
for i, a in ipairs(ack_keys) do
  local done = earlier[i] or settled[a[4]]
  if done then
    acked[#acked + 1] = done
  else
    local e = entries[i]
    if e then
      local f = e[2]
      if f and a[5] ~= '' then
        redis.call('PEXPIRE', a[3], ttl)
        redis.call('SET', a[2], a[5], 'PX', ttl)  -- for sent_message
      elseif f then  -- unkeyed: the message itself, for sent_message
        redis.call('SET', a[3], cjson.encode({a[4], field(f, 'to'), field(f, 'body'),
          field(f, 'seq'), field(f, 'at')}), 'PX', ttl)
      end
      local content = f and field(f, 'content')
      if content then redis.call('SET', a[7], content, 'PX', ttl) end
      gone[#gone + 1] = e[1]
      gone_ids[#gone_ids + 1] = a[4]
      redis.call('SET', a[1], a[6], 'PX', ttl)
      redis.call('PUBLISH', ARGV[6], a[4] .. ' ' .. a[6])
      settled[a[4]] = a[6]
    end
    acked[#acked + 1] = a[6]
  end
end
if #gone > 0 then
  in_steps({'XACK', KEYS[1], ARGV[7]}, gone)
  in_steps({'XDEL', KEYS[1]}, gone)
  in_steps({'HDEL', KEYS[2]}, gone_ids)
end
local accepted, fresh, last_added = {}, 0, nil
local depth = redis.call('XLEN', KEYS[1])
local max_depth = tonumber(ARGV[2])
local seq, ids = nil, {}  -- the sequence counter, read once and written back once
for n = first_new, #ARGV, 5 do
  local mid, to, body, key, content = ARGV[n], ARGV[n + 1], ARGV[n + 2], ARGV[n + 3],
    ARGV[n + 4]
  local idem = nil
  if key ~= '' then idem = KEYS[k]; k = k + 1 end
  local known = idem and redis.call('GET', idem)
  if known then
    -- rewritten as is: a propagated write, so a WAIT after this script also covers
    -- the record (accepted earlier, maybe on another connection)
    redis.call('SET', idem, known, 'KEEPTTL')
    accepted[#accepted + 1] = {'dup', known}
  elseif depth >= max_depth then
    accepted[#accepted + 1] = {'full', tostring(depth)}
  else
    seq = (seq or tonumber(redis.call('GET', KEYS[3]) or '0')) + 1
    local seq_text = string.format('%d', seq)
    if content == '' then
      last_added = redis.call('XADD', KEYS[1], '*', 'mid', mid, 'to', to, 'body', body,
        'key', key, 'seq', seq_text, 'at', at)
    else
      last_added = redis.call('XADD', KEYS[1], '*', 'mid', mid, 'to', to, 'body', body,
        'key', key, 'seq', seq_text, 'at', at, 'content', content)
    end
    ids[#ids + 1] = mid
    ids[#ids + 1] = last_added
    local record = cjson.encode({mid, to, body, seq_text, at})
    if idem then redis.call('SET', idem, record) end
    depth, fresh = depth + 1, fresh + 1
    accepted[#accepted + 1] = {'new', record}
  end
end
if seq then redis.call('SET', KEYS[3], string.format('%d', seq)) end
in_steps({'HSET', KEYS[2]}, ids)
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

# KEYS: outbox stream, ids hash.  ARGV: message ids
# Per message id, the idempotency key its outbox entry carries ('' none or unknown):
# what APPLY_OUTBOX must be told (declared) for an ack the caller has no key for.
ACK_KEYS = """
local out = {}
for i, mid in ipairs(ARGV) do
  local key = ''
  local entry = redis.call('HGET', KEYS[2], mid)
  if entry then
    local rows = redis.call('XRANGE', KEYS[1], entry, entry)
    if rows[1] then
      local f = rows[1][2]
      for j = 1, #f, 2 do
        if f[j] == 'key' then key = f[j + 1] end
      end
    end
  end
  out[i] = key
end
return out
"""

#: prune(key, group, keep, release, min_idle): deletes the group's consumers that
#: hold nothing pending and are `release` or idle for `min_idle` ms (never `keep`);
#: a consumer holding entries is kept, or they could never be claimed again.
PRUNE = """
local function prune(key, group, keep, release, min_idle)
  local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', key, group)
  if not ok then return 0 end  -- no stream or no group: nothing to prune
  local deleted = 0
  for _, c in ipairs(consumers) do
    local name, pending, idle = nil, 0, 0
    for i = 1, #c, 2 do
      if c[i] == 'name' then name = c[i + 1]
      elseif c[i] == 'pending' then pending = tonumber(c[i + 1])
      elseif c[i] == 'idle' then idle = tonumber(c[i + 1]) end
    end
    if name and name ~= keep and pending == 0 and (name == release or idle >= min_idle) then
      redis.call('XGROUP', 'DELCONSUMER', key, group, name)
      deleted = deleted + 1
    end
  end
  return deleted
end
"""

# KEYS: outbox stream, fence.  ARGV: group, consumer, token
# Takes over former owners' unacked entries, then deletes their consumers (each
# restart of an instance may read under a new name); returns how many this one holds.
CLAIM_OUTBOX = FENCED + TAKE_OVER + PRUNE + """
if fenced(KEYS[2], ARGV[3]) then return refuse(ARGV[3]) end
local held = take_over(KEYS[1], ARGV[1], ARGV[2])
prune(KEYS[1], ARGV[1], ARGV[2], '', 0)
return held
"""

# KEYS: inbound stream.  ARGV: group, consumer ('' none), min_idle_ms
# Deletes `consumer` (a Receive call's, once it ended) and consumers idle for
# min_idle_ms, each only if it holds nothing pending; returns how many went.
RELEASE_CONSUMERS = PRUNE + """
return prune(KEYS[1], ARGV[1], '', ARGV[2], tonumber(ARGV[3]))
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

# KEYS: a topic's stream (inbound, updates), seen hash, aged sorted set, fence, media
#       hash (upstream id -> a medium's bytes, trimmed with the seen hash).
# ARGV: at, retention (ms; 0: keep everything), token, then per entry: upstream id,
#       sender, body, origin (InboundOrigin JSON, "" if none), content (the stored
#       payload, "" if none), media (the bytes, "" if none)
# Returns per entry its new stream id, or "" when the upstream id is already stored.
# Ages come from the stream's entry ids, Redis's clock, whoever's broker adds.
ADD_INBOUND = FENCED + IN_STEPS + """
if fenced(KEYS[4], ARGV[3]) then return refuse(ARGV[3]) end
local uids = {}
for n = 4, #ARGV, 6 do uids[#uids + 1] = ARGV[n] end
local stored = {}  -- per entry: its upstream id is stored already (false: not)
for i = 1, #uids, 1000 do
  local part = redis.call('HMGET', KEYS[2], unpack(uids, i, math.min(i + 999, #uids)))
  for j = 1, #part do stored[i + j - 1] = part[j] end
end
local added, newest, now_stored, seen, media = {}, nil, {}, {}, {}
for i, uid in ipairs(uids) do
  local n = 4 + 6 * (i - 1)
  if stored[i] or now_stored[uid] then
    added[i] = ''
  else
    local entry
    if ARGV[n + 4] ~= '' then
      entry = redis.call('XADD', KEYS[1], '*', 'uid', uid, 'from', ARGV[n + 1],
        'body', ARGV[n + 2], 'at', ARGV[1], 'o', ARGV[n + 3], 'c', ARGV[n + 4])
    else
      entry = redis.call('XADD', KEYS[1], '*', 'uid', uid, 'from', ARGV[n + 1],
        'body', ARGV[n + 2], 'at', ARGV[1], 'o', ARGV[n + 3])
    end
    if ARGV[n + 5] ~= '' then
      media[#media + 1] = uid
      media[#media + 1] = ARGV[n + 5]
    end
    seen[#seen + 1] = uid
    seen[#seen + 1] = entry
    now_stored[uid] = true
    added[i] = entry
    newest = entry
  end
end
in_steps({'HSET', KEYS[2]}, seen)
in_steps({'HSET', KEYS[5]}, media)
local retention = tonumber(ARGV[2])
if retention > 0 and newest then
  local now = tonumber(string.match(newest, '^(%d+)'))
  local cutoff = now - retention
  local aged = {}
  for i, uid in ipairs(uids) do
    if added[i] ~= '' then
      aged[#aged + 1] = now
      aged[#aged + 1] = uid
    end
  end
  in_steps({'ZADD', KEYS[3]}, aged)
  redis.call('XTRIM', KEYS[1], 'MINID', cutoff)
  local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. cutoff, 'LIMIT', 0, 256)
  if #old > 0 then
    redis.call('HDEL', KEYS[2], unpack(old))
    redis.call('HDEL', KEYS[5], unpack(old))
    redis.call('ZREM', KEYS[3], unpack(old))
  end
end
return added
"""
