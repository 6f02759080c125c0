"""`validate` on 20,000 rows of `s3://` inputs, each object HEAD-checked: time and peak memory.

Against moto's S3 server on this machine (a round trip of well under a millisecond of network,
most of it moto's own work), so the figure is the checking's own cost, not a real bucket's
latency. Beside it in the same run: the same manifest with URL inputs (no HEADs: the floor),
and 2,000 `s3://` rows (memory must not grow much with the manifest).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import table, write_result

ROWS = int(os.environ.get("BENCH_ROWS", "20000"))
EXE = str(Path(sys.executable).with_name("seedream-batch"))
BUCKET = "bench-inputs"
PNG = (
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10\x00\x00\x00\x10\x08\x02\x00\x00\x00\x90\x91h6"
    b"\x00\x00\x00\x0cIDATx\x9cc\xf8\xcf\xc0\x00\x00\x03\x01\x01\x00\xc9\xfe\x92\xef\x00\x00\x00\x00IEND\xaeB`\x82"
)


def moto(port: int) -> subprocess.Popen[bytes]:
    import httpx

    cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/moto-api/", timeout=1).status_code < 500:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("moto server did not start")


_MEASURE = """
import json, os, sys, time
t0 = time.monotonic()
pid = os.fork()
if pid == 0:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(json.dumps([time.monotonic() - t0, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)]))
"""


def run(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MB and exit code of `cmd`, forked from a small fresh process: a
    child forked from this one (boto3 loaded, 20,000 puts made) would count this one's pages."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, check=True)
    seconds, mb, code = json.loads(out.stdout)
    return float(seconds), float(mb), int(code)


def make_manifest(path: Path, rows: int, s3: bool) -> None:
    with path.open("w") as fh:
        fh.write("id,prompt,images\n")
        for i in range(rows):
            image = f"s3://{BUCKET}/photos/{i:07d}.png" if s3 else f"https://cdn.example.com/p/{i}.png"
            fh.write(f"sku-{i:07d},same product on white marble {i},{image}\n")


def main() -> None:
    import boto3

    from sandbox.server import free_port

    port = free_port("127.0.0.1")
    server = moto(port)
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "ATLASCLOUD_API_BASE": "http://127.0.0.1:9/api/v1",  # no /models here: the built-in rules
    }
    os.environ.update(env)
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket=BUCKET)
        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: s3.put_object(Bucket=BUCKET, Key=f"photos/{i:07d}.png", Body=PNG), range(ROWS)))
        print(f"{ROWS:,} objects put in {time.monotonic() - t0:.1f} s")
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            urls, small, big = Path(tmp) / "urls.csv", Path(tmp) / "small.csv", Path(tmp) / "big.csv"
            make_manifest(urls, ROWS, s3=False)
            make_manifest(small, ROWS // 10, s3=True)
            make_manifest(big, ROWS, s3=True)
            for label, path in [
                (f"validate {ROWS:,} URL rows (no HEAD, floor)", urls),
                (f"validate {ROWS // 10:,} s3:// rows", small),
                (f"validate {ROWS:,} s3:// rows", big),
            ]:
                best = min((run([EXE, "validate", str(path)]) for _ in range(3)), key=lambda r: r[0])
                assert best[2] == 0, f"{label} exited {best[2]}"
                rows.append({"what": label, "seconds": best[0], "peak_rss_mb": best[1]})
    finally:
        server.terminate()
        server.wait(timeout=10)
    heads = rows[2]["seconds"] - rows[0]["seconds"]
    ratios = {
        "heads_per_second": ROWS / heads if heads > 0 else None,
        "memory_20k_vs_2k": rows[2]["peak_rss_mb"] / rows[1]["peak_rss_mb"],
    }
    print(table(rows))
    print(table([ratios]))
    print(write_result("validate_s3", {"rows": ROWS, "runs": rows, "ratios": ratios}))


if __name__ == "__main__":
    main()
