"""report.html: a self-contained before/after gallery of a run, safe to open and usable at 10,000 jobs.

Nothing from the manifest or the service is ever written as markup: the summary is escaped
here, the jobs travel as JSON inside a script element (every `<` escaped, so no `</script>`
can end it) and the page builds its cards with `textContent`. A Content-Security-Policy with a
per-page nonce means that even a mistake in that escaping could not run an injected script.
The page loads nothing from the network; thumbnails are relative links (or presigned ones).
"""

from __future__ import annotations

import html
import json
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from manifests.models import micros_to_usd

_TEMPLATE = Path(__file__).with_name("gallery.html")
PAGE_SIZE = 60


CARD_FIELDS = ("id", "line", "status", "model", "prompt", "metadata", "cost", "error", "inputs", "reused")


def job_view(d: dict[str, Any], line_error: str) -> dict[str, Any]:
    """What a card shows of one job (its durable record), nothing more."""
    return {
        "id": d["id"],
        "line": d.get("line"),
        "status": d["state"],
        "model": d["model"],
        "prompt": d.get("prompt") or "",
        "metadata": {str(k): str(v) for k, v in (d.get("metadata") or {}).items()},
        "cost": micros_to_usd(int(d.get("cost_micros") or 0)),
        "error": line_error,
        "inputs": [str(v) for v in d.get("images") or []],
        "reused": str(d.get("reused_from") or ""),
    }


def render(
    summary: dict[str, Any],
    jobs: list[dict[str, Any]],
    *,
    link: Callable[[str], str] = lambda key: key,
    img_sources: str = "'self' file: data:",
) -> str:
    """The page; `link` turns a storage key into the href the page uses (relative, or presigned)."""
    cards = []
    for j in jobs:
        card = {k: j.get(k, "") for k in CARD_FIELDS}
        card["in"] = [link(k) if k else "" for k in j.get("thumbs_in", [])]
        card["out"] = [link(k) if k else "" for k in j.get("thumbs_out", [])]
        card["full"] = [link(k) if k else "" for k in j.get("full_out", [])]
        cards.append(card)
    nonce = secrets.token_urlsafe(16)
    data = json.dumps({"jobs": cards, "pageSize": PAGE_SIZE}, separators=(",", ":"), ensure_ascii=False)
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    e = html.escape
    counts = summary.get("counts") or {}
    by_model = summary.get("cost_by_model_usd") or {}
    budget = summary.get("budget") or {}
    facts = [
        ("jobs", f"{summary.get('jobs', 0):,}"),
        *((status, f"{n:,}") for status, n in sorted(counts.items())),
        ("total cost", f"${summary.get('total_cost_usd', '0')}"),
        *((f"cost, {m}", f"${c}") for m, c in by_model.items()),
        ("wall time", _duration(summary.get("wall_seconds"))),
    ]
    if summary.get("reused"):  # beside the total cost, before the cost of each model
        saved = f"{summary['reused']:,} (${summary.get('saved_usd')} not spent again)"
        facts.insert(len(facts) - 1 - len(by_model), ("reused", saved))
    if budget.get("cap_usd") is not None:
        facts.append(("budget used", f"${budget.get('spent_usd')} of ${budget.get('cap_usd')}"))
    header = "".join(f'<div class="fact"><b>{e(v)}</b><span>{e(k)}</span></div>' for k, v in facts)
    values = {
        "NONCE": nonce,
        "IMG_SOURCES": img_sources,
        "TITLE": e(f"run {summary.get('run_id') or ''}"),
        "FACTS": header,
        "DATA": data,
    }
    # one pass: text put in is never read again as a placeholder
    return re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: values[m.group(1)], _TEMPLATE.read_text(encoding="utf-8"))


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    s = int(seconds)
    return f"{s // 3600}h {s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s"
