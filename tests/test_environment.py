"""The process's environment is read in one module, jobs/environment.py, and handed on only by
the launcher of worker subprocesses (workers/local.py, as an `env=` it builds): a module that
looked itself would see a value the resolved settings do not, or see it at a different time.

The walk is of the ast, so a read inside a function counts, and so does `environ` imported
from os under any name. The sandbox is a separate program standing in for the service: it
reads its own environment and is not walked.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WALKED = ("manifests", "jobs", "workers", "cli")
ALLOWED = {"jobs/environment.py", "workers/local.py"}
NAMES = {"environ", "getenv", "putenv", "unsetenv", "environb", "getenvb"}


def files() -> list[Path]:
    found = [ROOT / "celeryconfig.py"]
    for package in WALKED:
        found.extend(sorted((ROOT / package).rglob("*.py")))
    return found


def reads(source: str) -> list[str]:
    """Where `source` touches the environment: `os.environ`, `os.getenv(...)`, `os.putenv`,
    a name imported from os that is one of these, or the os module under another name."""
    tree = ast.parse(source)
    os_names = {"os"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            os_names.update(a.asname or a.name for a in node.names if a.name == "os")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "os":
            found.extend(f"line {node.lineno}: from os import {a.name}" for a in node.names if a.name in NAMES)
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in NAMES
            and isinstance(node.value, ast.Name)
            and node.value.id in os_names
        ):
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_only_the_environment_module_reads_the_environment() -> None:
    bad = []
    for path in files():
        rel = path.relative_to(ROOT).as_posix()
        if rel in ALLOWED:
            continue
        bad.extend(f"{rel} {where}" for where in reads(path.read_text(encoding="utf-8")))
    assert bad == []


def test_the_environment_module_is_the_one_that_reads() -> None:
    """The exemption is not dead: if the reading moved, this test should move with it."""
    assert reads((ROOT / "jobs" / "environment.py").read_text(encoding="utf-8"))


def test_the_check_catches_a_planted_read() -> None:
    planted = {
        "import os\nX = os.environ.get('A')\n": "os.environ",
        "import os\ndef f():\n    return os.getenv('A')\n": "os.getenv",
        "import os as o\no.putenv('A', '1')\n": "o.putenv",
        "from os import environ\n": "from os import environ",
        "from os import getenv as g\n": "from os import getenv",
    }
    for source, expected in planted.items():
        found = reads(source)
        assert len(found) == 1 and expected in found[0], (source, found)
    assert reads("import os\nos.path.exists('x')\nenviron = {}\n") == []
