"""`run --wait` as a person sees it: one bar redrawn in place on a terminal, calm plain lines
in a log, one JSON object per update from `watch --json`."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

from tests.pipeline import EXE, Pipeline, catalog, run_id_of

CSI = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])")


def screen(raw: str, width: int = 200) -> list[str]:
    """What a terminal shows after `raw`: text, CR, LF and the cursor moves and line erases
    rich redraws with (colours and cursor hiding change nothing on the screen)."""
    lines, row, col = [""], 0, 0
    i = 0
    while i < len(raw):
        m = CSI.match(raw, i)
        if m:
            arg, op = m.group(1), m.group(2)
            n = int(arg) if arg.isdigit() else 1
            if op == "A":
                row = max(0, row - n)
            elif op == "B":
                row += n
            elif op == "K":
                lines[row] = "" if arg == "2" else lines[row][:col]
            elif op == "G":
                col = n - 1
            i = m.end()
            continue
        ch = raw[i]
        i += 1
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row += 1
        elif ch == "\x1b":
            continue
        else:
            text = lines[row].ljust(col)
            lines[row] = text[:col] + ch + text[col + 1 :]
            col = min(col + 1, width)
        while len(lines) <= row:
            lines.append("")
    return [ln.rstrip() for ln in lines]


def run_in_terminal(pipe: Pipeline, args: list[str], timeout: float = 120) -> tuple[int, str]:
    """The CLI with a pseudo-terminal as stdin/stdout/stderr (200 columns), read to its end."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    env = {**pipe.env, "TERM": "xterm-256color", "COLUMNS": "200", "LINES": "50"}
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen([EXE, *args], stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def slow_catalog(pipe: Pipeline, n: int = 12):  # type: ignore[no-untyped-def]
    """A run that lasts a few seconds: every snapshot has something left to do, so ETAs show."""
    pipe.sandbox.configure(delay="uniform:0.5:1.5")
    pipe.extra_env["SEEDREAM_SUBMIT_RATE"] = "4"
    manifest, _ = catalog(pipe.tmp, pipe.sandbox, n)
    pipe.start_workers(1, concurrency=4)
    return manifest


def test_run_wait_on_a_terminal_redraws_one_bar_in_place(pipe: Pipeline) -> None:
    manifest = slow_catalog(pipe)
    args = ["run", str(manifest), "--output", str(pipe.tmp / "out"), "--budget", "5", "--wait"]
    code, raw = run_in_terminal(pipe, args)
    assert code == 0, raw[-3000:]
    shown = screen(raw)
    bars = [ln for ln in shown if "ok ·" in ln]
    assert len(bars) == 1, shown  # redrawn in place, not scrolled
    final = bars[0]
    assert "12/12" in final and "12 ok · 0 failed · 0 skipped · 0 uncertain" in final, final
    assert re.search(r"\$\d+\.\d+ spent · budget \$\d+\.\d+ of \$5\.00", final), final
    assert re.search(r"submits \d+\.\d/s of 4/s", final) and "done in" in final, final
    frames = re.findall(r"\d+/12 +\d+ ok", CSI.sub("", raw))
    assert len(frames) >= 3, frames  # drawn many times over
    assert "\x1b[2K" in raw  # ... each time over the last
    eta = re.findall(r"ETA (\d+m)?\d+(\.\d)?s", CSI.sub("", raw))
    assert eta, "no ETA was shown while the run was under way"
    assert "done:" not in raw  # no plain lines on a terminal
    assert any(ln.startswith("report: ") for ln in shown)


def test_run_wait_without_a_terminal_prints_plain_lines(pipe: Pipeline) -> None:
    manifest = slow_catalog(pipe)
    done = pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "out"), "--wait")
    assert done.returncode == 0, done.stderr
    assert "\x1b[" not in done.stdout and "\r" not in done.stdout
    lines = [ln for ln in done.stdout.splitlines() if " done: " in ln]
    assert lines and lines[-1].startswith("12/12 done: 12 ok, 0 failed, 0 skipped, 0 uncertain; $")
    assert len(lines) <= 4  # a line every few seconds, not one per snapshot


def test_watch_json_prints_one_object_per_update(pipe: Pipeline) -> None:
    manifest = slow_catalog(pipe, n=6)
    started = pipe.cli("run", str(manifest), "--output", str(pipe.tmp / "out"), "--no-wait")
    assert started.returncode == 0, started.stderr
    watched = pipe.cli("watch", run_id_of(started.stdout), "--json")
    assert watched.returncode == 0, watched.stderr
    docs = [json.loads(ln) for ln in watched.stdout.splitlines()]
    assert len(docs) >= 2 and docs[-1]["done"] and docs[-1]["counts"]["succeeded"] == 6
    assert [d["finished"] for d in docs] == sorted(d["finished"] for d in docs)
    assert docs[-1]["submit_rate_limit"] == 4.0 and "submits_per_second" in docs[-1]
