"""`make demo`: start the local sandbox and do one real round trip through the client.

Upload a product photo, submit an edit, poll until done, download the output and
check it is an image of the requested size. (The full batch demo replaces this
once the pipeline exists.)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs.config import AtlasConfig
from jobs.images import inspect
from sandbox.server import SandboxProcess
from workers.atlas import AtlasClient

OUT = Path("demo-output")


def main() -> int:
    from PIL import Image

    OUT.mkdir(exist_ok=True)
    src = OUT / "sku-1001.png"
    Image.new("RGB", (320, 240), (200, 80, 40)).save(src)
    with SandboxProcess(settings={"delay": "lognormal:1.5:0.3"}) as sb:
        print(f"sandbox answering at {sb.api_base}")
        with AtlasClient(AtlasConfig(api_key="demo-key", api_base=sb.api_base)) as client:
            url = client.upload(src.name, src.read_bytes(), "image/png")
            print(f"uploaded  {src} -> {url}")
            sub = client.submit(
                "bytedance/seedream-v4/edit",
                {
                    "prompt": "same product on white marble, soft daylight",
                    "images": [url],
                    "size": "1280*960",
                },
            )
            print(f"submitted prediction {sub.id}")
            polls = 0
            while not (pred := client.get_prediction(sub.id)).done:
                polls += 1
                time.sleep(0.5)
            price = (pred.price_micros or 0) / 1e6
            print(f"finished  status={pred.status} after {polls + 1} polls, price=${price:.3f}")
            if not pred.outputs:
                print(f"failed: {pred.error}")
                return 1
            data = client.download(pred.outputs[0]).content
            info = inspect(data)
            dest = OUT / f"sku-1001-edit.{info.extension}"
            dest.write_bytes(data)
            print(f"stored    {dest} ({info.format} {info.width}x{info.height}, {len(data):,} bytes)")
        acc = sb.accounting()
        print(f"sandbox billed ${acc['billed_usd']} for {acc['billed_count']} prediction(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
