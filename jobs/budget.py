"""Budgets in integer micro-dollars, shared by every worker: reserve before a submit, settle after.

A budget belongs to a run, or to a campaign name several runs share. Reserving
is refused when spent + reserved + price would pass the cap. Every operation is
idempotent per job (a redelivered task reserves or settles nothing twice), and
an uncertain submit is settled at list price: it may have been billed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import redis

from jobs.errors import ConfigError
from jobs.redisio import DEFAULT_PREFIX, script, translated

SCOPE_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")

_RESERVE = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 or redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  return 1
end
local cap = redis.call('HGET', KEYS[1], 'cap')
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
local amount = tonumber(ARGV[2])
if cap and spent + reserved + amount > tonumber(cap) then
  redis.call('HINCRBY', KEYS[1], 'refused', 1)
  return 0
end
redis.call('HINCRBY', KEYS[1], 'reserved', amount)
redis.call('HSET', KEYS[2], ARGV[1], amount)
return 1
"""

_SETTLE = """
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then return 0 end
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held then
  redis.call('HINCRBY', KEYS[1], 'reserved', -tonumber(held))
  redis.call('HDEL', KEYS[2], ARGV[1])
end
redis.call('HINCRBY', KEYS[1], 'spent', tonumber(ARGV[2]))
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
return 1
"""

_RELEASE = """
local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held then return 0 end
redis.call('HINCRBY', KEYS[1], 'reserved', -tonumber(held))
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class BudgetState:
    cap_micros: int | None
    spent_micros: int
    reserved_micros: int
    refused: int

    @property
    def remaining_micros(self) -> int | None:
        if self.cap_micros is None:
            return None
        return max(0, self.cap_micros - self.spent_micros - self.reserved_micros)


class Budget:
    def __init__(self, client: redis.Redis, scope: str, *, prefix: str = DEFAULT_PREFIX) -> None:
        if not SCOPE_PATTERN.fullmatch(scope):
            raise ConfigError(f"budget scope {scope!r}: use letters, digits, '.', '_', '-' (at most 128)")
        self.client = client
        self.scope = scope
        base = f"{prefix}:budget:{scope}"
        self.keys = [base, f"{base}:reserved", f"{base}:settled"]
        self._reserve = script(client, _RESERVE)
        self._settle = script(client, _SETTLE)
        self._release = script(client, _RELEASE)

    @translated
    def set_cap(self, cap_micros: int | None) -> None:
        """Set (or lift, with None) the cap; the latest value a user gave wins."""
        if cap_micros is None:
            self.client.hdel(self.keys[0], "cap")
        else:
            self.client.hset(self.keys[0], "cap", int(cap_micros))

    @translated
    def reserve(self, job: str, amount_micros: int) -> bool:
        return bool(int(self._reserve(keys=self.keys, args=[job, int(amount_micros)])))

    @translated
    def settle(self, job: str, actual_micros: int) -> bool:
        """Record what `job` cost (its own price, else list price); False if already settled."""
        return bool(int(self._settle(keys=self.keys, args=[job, int(actual_micros)])))

    @translated
    def release(self, job: str) -> bool:
        """Give back a reservation: the job will not be billed (refused, failed before billing)."""
        return bool(int(self._release(keys=self.keys, args=[job])))

    @translated
    def settled(self, job: str) -> int | None:
        value = self.client.hget(self.keys[2], job)
        return None if value is None else int(value)

    @translated
    def state(self) -> BudgetState:
        data = self.client.hgetall(self.keys[0])
        cap = data.get("cap")
        return BudgetState(
            cap_micros=int(cap) if cap is not None else None,
            spent_micros=int(data.get("spent", 0)),
            reserved_micros=int(data.get("reserved", 0)),
            refused=int(data.get("refused", 0)),
        )
