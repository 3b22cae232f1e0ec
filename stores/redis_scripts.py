"""What the Redis backend runs on the server, and how its errors reach callers.

The Lua scripts make version switches, deletes, pins and the fallback read of
the current version atomic on the server; ``guarded`` turns redis-py errors
into :mod:`stores.base` errors that name the server (``StoreUnavailable`` for
connection problems, so callers can back off and retry).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import redis

from stores.base import StoreError, StoreUnavailable, VersionError

P = ParamSpec("P")
R = TypeVar("R")

# ARGV[1] = version. KEYS: versions hash, current, emb_ids, label_ids.
# Refuses an unknown / incomplete version and one whose data has expired.
SET_CURRENT_LUA = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return redis.error_reply('VERSION unknown teacher version ' .. ARGV[1]) end
local info = cjson.decode(raw)
if info['status'] ~= 'complete' then
  return redis.error_reply('VERSION version ' .. ARGV[1] .. ' is ' .. tostring(info['status'])
    .. '; only a complete one can become current')
end
local counts = info['counts']
if type(counts) == 'table' then
  if (tonumber(counts['embeddings']) or 0) > 0 and redis.call('EXISTS', KEYS[3]) == 0
     or (tonumber(counts['labels']) or 0) > 0 and redis.call('EXISTS', KEYS[4]) == 0 then
    return redis.error_reply('VERSION data of version ' .. ARGV[1] .. ' has expired or was deleted')
  end
end
redis.call('SET', KEYS[2], ARGV[1])
return 1
"""

# ARGV = version, now (unix s). KEYS: versions hash, current, pins set, leases hash, pin-age
# hash. Refuses while current, pinned or leased (live leases only). Removes the manifest entry
# *first*, so a reader that then misses keys knows the version is gone and retries.
DELETE_LUA = """
if redis.call('GET', KEYS[2]) == ARGV[1] then
  return redis.error_reply('VERSION version ' .. ARGV[1] .. ' is current; it cannot be deleted')
end
if redis.call('SCARD', KEYS[3]) > 0 then
  return redis.error_reply('VERSION version ' .. ARGV[1] .. ' is pinned by '
    .. table.concat(redis.call('SMEMBERS', KEYS[3]), ','))
end
local leases = redis.call('HGETALL', KEYS[4])
local live = {}
for i = 1, #leases, 2 do
  local expires = tonumber(string.match(leases[i + 1], ',(.*)$'))
  if expires and expires > tonumber(ARGV[2]) then live[#live + 1] = leases[i] end
end
if #live > 0 then
  table.sort(live)
  return redis.error_reply('VERSION version ' .. ARGV[1] .. ' is leased by '
    .. table.concat(live, ', '))
end
redis.call('DEL', KEYS[4], KEYS[5])
return redis.call('HDEL', KEYS[1], ARGV[1])
"""

# KEYS[1] = current; ARGV[1] = "ns:", ARGV[2..] = query ids. Resolves and reads in one
# atomic step: the fallback of read_current_labels when versions churn faster than it
# reads. (Label keys are built inside, so this is for standalone Redis, not Cluster.)
READ_CURRENT_LUA = """
local v = redis.call('GET', KEYS[1])
if not v then return redis.error_reply('VERSION no current version') end
local out = {}
local keys = {}
for i = 2, #ARGV do
  keys[#keys + 1] = ARGV[1] .. v .. ':label:' .. ARGV[i]
  if #keys == 1000 or i == #ARGV then
    for _, value in ipairs(redis.call('MGET', unpack(keys))) do out[#out + 1] = value end
    keys = {}
  end
end
return {v, out}
"""

# ARGV = version, consumer, now. KEYS: versions hash, pins set, pin-age hash.
PIN_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return redis.error_reply('VERSION unknown teacher version ' .. ARGV[1])
end
redis.call('HSETNX', KEYS[3], ARGV[2], ARGV[3])
return redis.call('SADD', KEYS[2], ARGV[2])
"""

# ARGV = version, owner, now, expires (unix s). KEYS: versions hash, leases hash. A lease is
# "created,expires"; renewing a live lease keeps its creation time. Returns the creation time.
LEASE_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return redis.error_reply('VERSION unknown teacher version ' .. ARGV[1])
end
local created = ARGV[3]
local old = redis.call('HGET', KEYS[2], ARGV[2])
if old then
  local c, e = string.match(old, '^(.*),(.*)$')
  if tonumber(e) > tonumber(ARGV[3]) then created = c end
end
redis.call('HSET', KEYS[2], ARGV[2], created .. ',' .. ARGV[4])
return created
"""


# KEYS: versions hash, ids set, seq hash. ARGV[1] = version, ARGV[2] = counts field
# ("embeddings" | "labels"), ARGV[3] = key prefix of the records, then (id, value) pairs.
# Appends to a complete version: SET NX per record (never overwrite), the next sequence
# number for each new one, counts and sequence in the manifest, all in one atomic step.
APPEND_LUA = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return redis.error_reply('VERSION unknown teacher version ' .. ARGV[1]) end
local info = cjson.decode(raw)
local seq = tonumber(info['sequence']) or 0
local added = 0
for i = 4, #ARGV, 2 do
  if redis.call('SET', ARGV[3] .. ARGV[i], ARGV[i + 1], 'NX') then
    seq = seq + 1
    added = added + 1
    redis.call('SADD', KEYS[2], ARGV[i])
    redis.call('HSET', KEYS[3], ARGV[i], seq)
  end
end
if added > 0 then
  info['sequence'] = seq
  local counts = info['counts']
  if type(counts) ~= 'table' then counts = {} end
  counts[ARGV[2]] = (tonumber(counts[ARGV[2]]) or 0) + added
  info['counts'] = counts
  redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(info))
end
return added
"""


def store_error(address: str, exc: redis.RedisError) -> StoreError:
    """The store error for a redis-py error; names the server, so logs say where."""
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return StoreUnavailable(f"cannot reach Redis at {address}: {exc}")
    if isinstance(exc, redis.exceptions.InvalidResponse):
        return StoreUnavailable(
            f"cannot reach Redis at {address}: invalid reply, is it a Redis server? {exc}"
        )
    msg = str(exc)
    if isinstance(exc, redis.ResponseError) and msg.startswith("VERSION "):
        return VersionError(msg.removeprefix("VERSION "))  # raised by our Lua scripts
    return StoreError(f"Redis at {address}: {msg}")


def guarded(
    method: Callable[Concatenate[Any, P], R],
) -> Callable[Concatenate[Any, P], R]:
    """Translate redis-py errors raised by a method into :mod:`stores.base` errors."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except redis.RedisError as exc:
            raise store_error(self.address, exc) from exc

    return wrapper
