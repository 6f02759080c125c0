"""`manifest`: a folder (or S3 prefix) of product photos and one prompt become a manifest that
validates and runs; the same folder gives the same ids every time."""

from __future__ import annotations

import csv
from pathlib import Path

import boto3

from tests.helpers import image_bytes
from tests.pipeline import Pipeline, run_id_of


def product_folder(tmp: Path) -> Path:
    """Photos in sub-folders, two files named alike, one too large, a note, a hidden file."""
    root = tmp / "products"
    (root / "shoes").mkdir(parents=True)
    (root / "bags").mkdir()
    (root / "shoes" / "Red Shoe.jpg").write_bytes(image_bytes(64, 48, "JPEG", color=(200, 0, 0)))
    (root / "shoes" / "blue.png").write_bytes(image_bytes(48, 48, color=(0, 0, 200)))
    (root / "bags" / "blue.jpg").write_bytes(image_bytes(40, 40, "JPEG", color=(0, 0, 150)))
    (root / "bags" / "tote.webp").write_bytes(image_bytes(50, 30, "WEBP", color=(10, 150, 10)))
    (root / "bags" / "huge.png").write_bytes(b"\x89PNG" + b"\0" * (11 * 1024 * 1024))
    (root / "notes.txt").write_text("shoot list: red shoe, blue things, tote\n")
    (root / ".DS_Store").write_bytes(b"\0\1\2")
    sheet = tmp / "products.csv"
    sheet.write_text(
        "id,name,sku\n"
        "Red-Shoe,Red leather shoe,S-100\n"
        "blue,Blue thing,=HYPERLINK(\"http://x\")\n"
        "tote,Canvas tote,S-300\n"
    )  # fmt: skip
    return root


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_folder_of_photos_becomes_a_manifest_that_validates_and_runs(pipe: Pipeline) -> None:
    root = product_folder(pipe.tmp)
    out = pipe.tmp / "m.csv"
    args = ["manifest", str(root), "--prompt", "{name} on white marble", "--join", str(pipe.tmp / "products.csv")]
    refused = pipe.cli(*args, "--out", str(out))
    assert refused.returncode == 2, refused.stderr
    assert "notes.txt: not an image" in refused.stderr and "bags/huge.png: is 11.0 MB" in refused.stderr
    assert "nothing was written" in refused.stderr and not out.exists()

    made = pipe.cli(*args, "--out", str(out), "--size", "2048x2048", "--skip-invalid")
    assert made.returncode == 0, made.stderr
    assert "4 rows, 2 files left out" in made.stderr
    got = rows(out)
    ids = [r["id"] for r in got]
    assert ids[1] == "tote" and ids[2] == "Red-Shoe"  # in path order: bags/..., shoes/...
    assert ids[0].startswith("blue-") and ids[3].startswith("blue-") and ids[0] != ids[3]  # same name twice
    assert got[2]["prompt"] == "Red leather shoe on white marble" and got[2]["images"] == "products/shoes/Red Shoe.jpg"
    assert got[0]["prompt"] == "Blue thing on white marble" and got[0]["sku"] == '\'=HYPERLINK("http://x")'
    assert {r["size"] for r in got} == {"2048*2048"}

    again = pipe.tmp / "again" / "m.jsonl"
    assert pipe.cli(*args, "--out", str(again), "--skip-invalid").returncode == 0
    assert [line.split('"id": "')[1].split('"')[0] for line in again.read_text().splitlines()] == ids

    valid = pipe.cli("validate", str(out))
    assert valid.returncode == 0 and "4 jobs OK" in valid.stdout, valid.stderr
    assert pipe.cli("validate", str(again)).returncode == 0
    pipe.start_workers(1, concurrency=4)
    done = pipe.cli("run", str(out), "--output", str(pipe.tmp / "out"), "--wait")
    assert done.returncode == 0, done.stderr
    run_id = run_id_of(done.stdout)
    assert "4/4 done: 4 ok" in done.stdout
    assert sorted(p.name for p in (pipe.tmp / "out" / run_id / "outputs").iterdir()) == sorted(ids)


def test_the_prompt_template_takes_named_fields_only(pipe: Pipeline) -> None:
    root = product_folder(pipe.tmp)
    for template, words in [
        ("{stem.__class__}", "no attribute or index access"),
        ("{stem[0]}", "no attribute or index access"),
        ("{0}", "without a name"),
        ("{stem!r}", "no conversion"),
        ("{colour}", "is not a field; known: name, parent, stem"),
        ("{stem", "malformed"),
    ]:
        out = pipe.cli("manifest", str(root), "--prompt", template, "--skip-invalid")
        assert out.returncode == 2 and words in out.stderr, (template, out.stderr)
        assert out.stdout == ""


def test_an_s3_prefix_becomes_a_manifest_of_s3_images(pipe: Pipeline, s3_endpoint: str) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="shop")
    for key, body in [("photos/a/Red Shoe.jpg", image_bytes(fmt="JPEG")), ("photos/b.png", image_bytes()),
                      ("photos/readme.md", b"# hi"), ("other/c.png", image_bytes())]:  # fmt: skip
        s3.put_object(Bucket="shop", Key=key, Body=body)
    args = ["manifest", "s3://shop/photos", "--prompt", "{stem} in {parent}", "--s3-endpoint", s3_endpoint]
    refused = pipe.cli(*args)
    assert refused.returncode == 2 and "readme.md: not an image" in refused.stderr
    made = pipe.cli(*args, "--skip-invalid")
    assert made.returncode == 0, made.stderr
    lines = made.stdout.splitlines()
    assert lines[0] == "id,prompt,images"
    assert lines[1:] == ["Red-Shoe,Red Shoe in a,s3://shop/photos/a/Red Shoe.jpg", "b,b in ,s3://shop/photos/b.png"]
    missing = pipe.cli("manifest", "s3://no-such-bucket/x", "--prompt", "p", "--s3-endpoint", s3_endpoint)
    assert missing.returncode == 1 and "cannot list s3://no-such-bucket/x: NoSuchBucket" in missing.stderr
