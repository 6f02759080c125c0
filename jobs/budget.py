"""Budgets in integer micro-dollars, shared by every worker: reserve before a submit, settle after.

A budget belongs to a run, or to a campaign name several runs share. Its ledger is
keyed by run, job and attempt (`ledger_key`), so runs whose rows share ids (next
month's re-shoot of the same SKUs) each count, and a retry that pays again is a
new entry. Reserving is refused when spent + reserved + amount would pass the cap,
or while the budget is stopped. Every operation is idempotent per entry (a
redelivered task reserves or settles nothing twice); settling an entry again with
another amount moves `spent` by the difference, so a late verdict corrects an
entry counted at list price. A settlement above its reservation (the service
charged more than the worst case) stops the budget's submits: the cap can no
longer be promised, and a person must look (`resume --clear-halt`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import redis

from jobs.keys import budget as budget_keys
from jobs.redisio import DEFAULT_PREFIX, script, translated
from manifests.errors import ConfigError

SCOPE_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")


def ledger_key(run_id: str, job_id: str, attempt: int) -> str:
    """One ledger entry: a job of a run at one paid attempt (run and job ids never hold '/')."""
    return f"{run_id}/{job_id}/{attempt}"


def worst_case(price_micros: int, params: Mapping[str, Any]) -> int:
    """The most a row can cost, what it reserves: its price for each image its params can yield."""
    n = params.get("max_images", 1)
    return price_micros * (n if isinstance(n, int) and n > 1 else 1)


_RESERVE = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 or redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  return 1
end
if redis.call('HEXISTS', KEYS[1], 'stopped') == 1 then
  redis.call('HINCRBY', KEYS[1], 'refused', 1)
  return 0
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

# A settlement above its reservation, or one that carries spent past the cap, stops the budget.
_SETTLE = """
local amount = tonumber(ARGV[2])
local prev = redis.call('HGET', KEYS[3], ARGV[1])
if prev and tonumber(prev) == amount then return 0 end
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held then
  redis.call('HINCRBY', KEYS[1], 'reserved', -tonumber(held))
  redis.call('HDEL', KEYS[2], ARGV[1])
end
redis.call('HINCRBY', KEYS[1], 'spent', amount - tonumber(prev or '0'))
redis.call('HSET', KEYS[3], ARGV[1], amount)
local cap = redis.call('HGET', KEYS[1], 'cap')
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent'))
if held and amount > tonumber(held) then
  redis.call('HSETNX', KEYS[1], 'stopped', 'the service charged ' .. amount .. ' micro-dollars for ' .. ARGV[1]
    .. ', above the ' .. held .. ' reserved for it: prices changed; submits stopped')
elseif cap and spent > tonumber(cap) then
  redis.call('HSETNX', KEYS[1], 'stopped', 'spent ' .. spent .. ' micro-dollars, past the cap of ' .. cap
    .. ': submits stopped')
end
return 1
"""

_RELEASE = """
local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held then return 0 end
redis.call('HINCRBY', KEYS[1], 'reserved', -tonumber(held))
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
"""

# A settled entry becomes a reservation again: its job was reopened to await a late verdict.
_UNSETTLE = """
local prev = redis.call('HGET', KEYS[3], ARGV[1])
if not prev then return 0 end
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'spent', -tonumber(prev))
redis.call('HINCRBY', KEYS[1], 'reserved', tonumber(prev))
redis.call('HSET', KEYS[2], ARGV[1], prev)
return 1
"""


@dataclass(frozen=True)
class BudgetState:
    cap_micros: int | None
    spent_micros: int
    reserved_micros: int
    refused: int
    stopped: str | None = None  # why the budget refuses every reservation (see _SETTLE)

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
        self.keys = budget_keys(prefix, scope)
        self._reserve = script(client, _RESERVE)
        self._settle = script(client, _SETTLE)
        self._release = script(client, _RELEASE)
        self._unsettle = script(client, _UNSETTLE)

    @translated
    def set_cap(self, cap_micros: int | None) -> None:
        """Set (or lift, with None) the cap; the latest value a user gave wins."""
        if cap_micros is None:
            self.client.hdel(self.keys[0], "cap")
        else:
            self.client.hset(self.keys[0], "cap", int(cap_micros))

    @translated
    def reserve(self, entry: str, amount_micros: int) -> bool:
        """Hold `amount_micros` for a ledger entry (see `ledger_key`); False when the cap would pass."""
        return bool(int(self._reserve(keys=self.keys, args=[entry, int(amount_micros)])))

    @translated
    def settle(self, entry: str, actual_micros: int) -> bool:
        """Record what the entry cost; settling it again with another amount corrects `spent`.
        False when it was already settled at this amount."""
        return bool(int(self._settle(keys=self.keys, args=[entry, int(actual_micros)])))

    @translated
    def release(self, entry: str) -> bool:
        """Give back a reservation: the attempt will not be billed (refused, failed before billing)."""
        return bool(int(self._release(keys=self.keys, args=[entry])))

    @translated
    def unsettle(self, entry: str) -> bool:
        """Turn a settled entry back into a reservation: its job awaits a verdict again."""
        return bool(int(self._unsettle(keys=self.keys, args=[entry])))

    @translated
    def settled(self, entry: str) -> int | None:
        value = self.client.hget(self.keys[2], entry)
        return None if value is None else int(value)

    @translated
    def clear_stop(self) -> str | None:
        """Lift a stop (after a person looked at why); returns the reason it had."""
        reason = self.client.hget(self.keys[0], "stopped")
        self.client.hdel(self.keys[0], "stopped")
        return None if reason is None else str(reason)

    @translated
    def state(self) -> BudgetState:
        data = self.client.hgetall(self.keys[0])
        cap = data.get("cap")
        return BudgetState(
            cap_micros=int(cap) if cap is not None else None,
            spent_micros=int(data.get("spent", 0)),
            reserved_micros=int(data.get("reserved", 0)),
            refused=int(data.get("refused", 0)),
            stopped=str(data["stopped"]) if data.get("stopped") else None,
        )
