"""docs/DEPLOY.md holds only commands the suite runs: each command line is matched to the
test or file that runs it, and a line that matches nothing fails here."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from tests.pipeline import EXE
from tests.test_ops import procfile
from workers.local import worker_args

ROOT = Path(__file__).resolve().parents[1]


def commands() -> list[list[str]]:
    text = (ROOT / "docs" / "DEPLOY.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    return [shlex.split(line) for block in blocks for line in block.splitlines() if line.strip()]


def test_every_command_in_the_deploy_guide_is_one_the_suite_runs() -> None:
    found = commands()
    assert len(found) >= 7
    procfile_lines = [argv[1:] for argv in procfile().values()]  # test_ops runs these verbatim
    redis_helper = (ROOT / "tests" / "chaos" / "redis_server.py").read_text()
    run_help = subprocess.run([EXE, "run", "--help"], capture_output=True, text=True, timeout=60).stdout
    for argv in found:
        head = argv[:2]
        if head == ["redis-server", "--port"]:  # the chaos suite's Redis, restarted mid-run
            assert all(f'"{flag}"' in redis_helper for flag in argv[2:] if flag.startswith("--")), argv
        elif head == ["seedream-batch", "config"]:  # tests/test_settings.py
            assert argv == ["seedream-batch", "config"]
        elif head == ["seedream-batch", "worker"]:  # tests/test_ops.py starts the Procfile's
            assert argv[1:] in procfile_lines, argv
        elif argv[:4] == ["celery", "-A", "workers", "worker"]:  # every pipeline test's workers
            used = worker_args(concurrency=int(argv[argv.index("--concurrency") + 1]), queue=argv[argv.index("-Q") + 1],
                               name=argv[argv.index("-n") + 1])  # fmt: skip
            assert set(argv[3:]) <= set(used), argv
        elif argv[:4] == ["celery", "-A", "workers", "flower"]:  # tests/test_flower.py
            assert argv[4:] == ["--port=5555"]
        elif head == ["seedream-batch", "run"]:  # tests/test_ops.py: --notify, --no-wait
            assert all(a in run_help for a in argv if a.startswith("--")), argv
        elif head == ["seedream-batch", "status"]:  # tests/test_ops.py checks --json's fields
            assert argv[3:] == ["--json"]
        else:
            raise AssertionError(f"docs/DEPLOY.md runs {argv}, which no test runs")
