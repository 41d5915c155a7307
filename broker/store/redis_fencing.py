"""Lua pieces shared by every script that grants or checks a fencing token.

A token is granted by `NEXT_TOKEN` (the lease's acquire, `new_fence`) and
checked by `FENCED` at the start of every owner write, in the same script as
the write, so no stale owner's write can slip in between check and write.
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
    return "" if fence is None else str(fence)
