"""Every command's exit codes, in one table: each command's `--help` and the README's table are
made from it (tests/test_cli_traps.py holds them to it), so a script's author never has to guess."""

from __future__ import annotations

import click

OK, ERROR, INVALID, PARTIAL, REFUSED = 0, 1, 2, 3, 4

_USAGE = (INVALID, "a flag or argument is wrong (the message says which)")
_ERROR = (ERROR, "Redis, the output or the service failed, or the run is not known (the message says where it looked)")

CODES: dict[str, list[tuple[int, str]]] = {
    "config": [(OK, "the settings were printed"), _USAGE],
    "sandbox": [(OK, "the sandbox was stopped"), _USAGE],
    "manifest": [
        (OK, "the manifest was written (invalid inputs left out only with --skip-invalid)"),
        (ERROR, "the source could not be listed or read (a folder, S3)"),
        (
            INVALID,
            "some inputs are not usable images and --skip-invalid was not given, or the prompt template "
            "is wrong: nothing was written",
        ),
    ],
    "validate": [(OK, "every row is valid"), (INVALID, "some rows are invalid, or a flag is wrong")],
    "estimate": [(OK, "the estimate was printed"), (INVALID, "some rows are invalid (without --skip-invalid)")],
    "run": [
        (OK, "every job succeeded (with --no-wait: the run was enqueued)"),
        _ERROR,
        (
            INVALID,
            "the manifest has invalid rows (nothing enqueued), or the flags cannot work together "
            "(e.g. --workers with --no-wait)",
        ),
        (PARTIAL, "the run ended with jobs failed, skipped, uncertain or overdue"),
        (REFUSED, "the budget or the balance cannot pay for every job (without --allow-partial): nothing spent"),
    ],
    "status": [(OK, "the run's progress was printed"), _ERROR, _USAGE],
    "runs": [(OK, "the runs were listed (maybe none)"), _ERROR, _USAGE],
    "watch": [(OK, "every job succeeded"), _ERROR, (PARTIAL, "the run ended with jobs not succeeded")],
    "cancel": [(OK, "submits stopped"), _ERROR],
    "retry-failed": [(OK, "the failed jobs were enqueued again"), _ERROR],
    "resume": [
        (OK, "the run was resumed (with --wait: and every job succeeded)"),
        _ERROR,
        (PARTIAL, "with --wait: the run ended with jobs not succeeded"),
    ],
    "reconcile": [
        (OK, "the run's ledger and the service's agree"),
        (ERROR, "the service's ledger could not be read, or the run is not known"),
        (PARTIAL, "the ledgers differ"),
    ],
    "report": [(OK, "the report was written"), _ERROR],
    "worker": [(OK, "the worker stopped warm"), (ERROR, "the worker could not start"), _USAGE],
    "doctor": [
        (OK, "nothing would break a run (warnings allowed)"),
        (ERROR, "the settings cannot be read"),
        (REFUSED, "a check failed"),
    ],
}


def epilog(command: str) -> str:
    """The `--help` text; `\\b` keeps click from rewrapping the table."""
    rows = "\n".join(f"  {code}  {meaning}" for code, meaning in CODES[command])
    return f"\b\nExit codes:\n{rows}"


def document(group: click.Group) -> None:
    """Give every command of `group` its exit codes in `--help`; a command without any is a bug."""
    for name, command in group.commands.items():
        command.epilog = epilog(name)


def markdown() -> str:
    """The README's table."""
    lines = ["| command | exit codes |", "| --- | --- |"]
    for command, codes in CODES.items():
        lines.append(f"| `{command}` | " + "; ".join(f"{code}: {meaning}" for code, meaning in codes) + " |")
    return "\n".join(lines)
