"""`seedream-batch sandbox` and `python -m sandbox`: the stand-in's own command line. It lives
here, not in the client's CLI, so the sandbox imports nothing of the client side (as the real
service would not)."""

from __future__ import annotations

import json

import click

from sandbox.settings import Faults, SandboxSettings


@click.command("sandbox")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8787, show_default=True, type=int, help="Port to listen on.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of every random choice.")
@click.option(
    "--delay",
    default="fixed:0",
    show_default=True,
    help="Prediction time: fixed:S, lognormal:MEDIAN:SIGMA or uniform:LOW:HIGH.",
)
@click.option("--submit-rate", default=0.0, type=float, help="Submits/s per key (0: no limit).")
@click.option("--submit-burst", default=0, type=int, help="Submit bucket size (0: one second's worth).")
@click.option("--max-in-flight", default=0, type=int, help="Predictions in progress per key (0: no limit).")
@click.option(
    "--balance",
    "balance_usd",
    default=10_000.0,
    type=float,
    show_default=True,
    help="Account balance in USD; submits past it get 402.",
)
@click.option(
    "--fault",
    "faults",
    multiple=True,
    metavar="NAME=RATE",
    help=f"Inject a fault with a probability; names: {', '.join(Faults.__dataclass_fields__)}.",
)
@click.option("--settings-json", default="", help="All settings as one JSON object (overrides flags).")
def sandbox_command(
    host: str,
    port: int,
    seed: int,
    delay: str,
    submit_rate: float,
    submit_burst: int,
    max_in_flight: int,
    balance_usd: float,
    faults: tuple[str, ...],
    settings_json: str,
) -> None:
    """Serve a local Atlas Cloud stand-in (API, files, faults, accounting) over HTTP."""
    from sandbox.server import serve

    settings = SandboxSettings()
    try:
        fault_rates = {}
        for item in faults:
            name, _, rate = item.partition("=")
            fault_rates[name.strip()] = float(rate)
        settings.update(
            {
                "seed": seed,
                "delay": delay,
                "submit_rate": submit_rate,
                "submit_burst": submit_burst,
                "max_in_flight": max_in_flight,
                "balance_usd": balance_usd,
                "faults": fault_rates,
            }
        )
        if settings_json:
            settings.update(json.loads(settings_json))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    click.echo(f"sandbox: http://{host}:{port}/api/v1 (admin: http://{host}:{port}/_sandbox/accounting)")
    serve(host, port, settings)
