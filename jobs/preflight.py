"""Before a run spends anything: does its estimate fit the budget and the account's balance?"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Protocol

from jobs.budget import BudgetState
from jobs.estimate import Estimate
from manifests.errors import AgentRefused, AuthError, ServiceError
from manifests.models import micros_to_usd


class _Balance(Protocol):
    @property
    def available(self) -> Decimal | None: ...


class BalanceSource(Protocol):
    """What preflight needs of the Atlas client (workers/atlas.py), which sits a layer above."""

    def balance(self) -> _Balance: ...


@dataclass
class Verdict:
    ok: bool = True
    messages: list[str] = field(default_factory=list)

    def refuse(self, message: str) -> None:
        self.ok = False
        self.messages.append(message)


def account_balance(client: BalanceSource) -> tuple[Decimal | None, str | None]:
    """The account's available USD, or None with a note when the service will not say."""
    try:
        available = client.balance().available
    except AgentRefused:
        raise  # its message says what to set; it is not the key's fault
    except AuthError as exc:
        raise AuthError(f"the API key was refused: {exc.message}", status=exc.status) from None
    except ServiceError as exc:
        return None, f"balance unavailable ({exc.message}); going on without it"
    if available is None:
        return None, "the balance answer holds no amount in USD; going on without it"
    return available, None


def check(
    est: Estimate, budget: BudgetState | None, balance_usd: Decimal | float | None, *, allow_partial: bool
) -> Verdict:
    verdict = Verdict()
    need = est.total_micros
    hint = "pass --allow-partial to run until it is spent (the rest are skipped)"
    remaining = budget.remaining_micros if budget is not None else None
    if remaining is not None and need > remaining:
        assert budget is not None
        text = (
            f"the batch costs ${micros_to_usd(need)} but the budget has ${micros_to_usd(remaining)} left "
            f"(cap ${micros_to_usd(budget.cap_micros or 0)}, spent ${micros_to_usd(budget.spent_micros)}, "
            f"reserved ${micros_to_usd(budget.reserved_micros)})"
        )
        if est.fit_jobs is not None:
            text += f"; {est.fit_jobs:,} of {est.jobs:,} jobs fit"
        if allow_partial:
            verdict.messages.append(text + "; running until the budget is spent")
        else:
            verdict.refuse(f"{text}; {hint}")
    if balance_usd is not None:
        affordable = need if remaining is None else min(need, remaining)
        balance_micros = int((Decimal(str(balance_usd)) * 1_000_000).to_integral_value())
        if balance_micros < affordable:
            text = (
                f"the account balance is ${micros_to_usd(balance_micros)}, less than the "
                f"${micros_to_usd(affordable)} this run may spend"
            )
            if allow_partial:
                verdict.messages.append(text + "; the service will refuse submits when it runs out")
            else:
                verdict.refuse(f"{text}; top up, lower the budget, or {hint}")
    return verdict
