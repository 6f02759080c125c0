"""Manifest reading and validation: the bad-manifest corpus, and what valid rows become."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.main import EXIT_INVALID, main
from manifests.addresses import is_internal_host
from manifests.models import ModelTable
from manifests.spec import JobSpec
from manifests.validate import Validator
from tests.helpers import image_bytes

CORPUS = Path(__file__).parent / "manifests_bad"
V4, V45 = "bytedance/seedream-v4/edit", "bytedance/seedream-v4.5/edit"

# file -> every problem expected: (line, field, words in the message). Nothing else may be reported.
EXPECTED: dict[str, list[tuple[int, str | None, str]]] = {
    "missing_id_column.csv": [(1, "id", "required column is missing")],
    "missing_images_column.csv": [(1, "images", "required column is missing")],
    "typo_column.csv": [(1, "promt", "did you mean 'prompt'"), (1, "prompt", "required column is missing")],
    "reserved_metadata_column.csv": [(1, "status", "column of the report")],
    "unnamed_column.csv": [(1, "column 4", "no name")],
    "duplicate_column.csv": [(1, "Prompt", "appears twice")],
    "empty_row.csv": [(3, None, "empty row")],
    "bad_quoting.csv": [(3, None, "malformed CSV")],
    "unterminated_quote.csv": [(4, None, "malformed CSV")],
    "wrong_cell_count.csv": [(2, None, "3 cells but the header has 7")],
    "duplicate_id.csv": [(4, "id", "duplicate id 'a' (first on line 2)")],
    "duplicate_id_case.csv": [
        (4, "id", "duplicate id 'sku1' ignoring case (first on line 2"),
        (5, "id", "duplicate id 'Sku1' ignoring case (first on line 2"),
        (6, "id", "duplicate id 'SKU1' (first on line 2)"),
    ],
    "unsafe_id_traversal.csv": [(2, "id", "not a safe id")],
    "unsafe_id_dots.csv": [(3, "id", "not a safe id")],
    "unsafe_id_too_long.csv": [(2, "id", "not a safe id")],
    "unsafe_id_space.csv": [(2, "id", "not a safe id")],
    "blank_prompt.csv": [(2, "prompt", "is blank")],
    "control_in_prompt.jsonl": [
        (1, "prompt", "control character U+0000"),
        (3, "prompt", "control character U+001B"),
        (4, "prompt", "control character U+007F"),
    ],
    "zero_images.csv": [(3, "images", "has no images")],
    "too_many_images.csv": [(2, "images", "has 11 images")],
    "unknown_model.csv": [(2, "model", "unknown model 'bytedance/seedream-v9/edit'")],
    "unknown_param.csv": [(2, "params.steps", "unknown parameter")],
    "params_not_json.csv": [(2, "params", "not valid JSON")],
    "reserved_param.csv": [(2, "params.prompt", "in its own column")],
    "unsupported_param.csv": [(2, "params.enable_base64_output", "not supported")],
    "size_too_small_v45.csv": [(2, "size", "needs 3,686,400 to 16,777,216")],
    "size_too_large.csv": [(2, "size", "67,108,864 pixels")],
    "size_aspect.csv": [(2, "size", "aspect ratio")],
    "size_malformed.csv": [(2, "size", "not W*H")],
    "missing_local_file.csv": [(2, "images[1]", "file not found")],
    "not_an_image.csv": [(2, "images[1]", "not a usable image")],
    "corrupt_image.csv": [(2, "images[1]", "corrupt or truncated")],
    "tiny_image.csv": [(2, "images[1]", "more than 14 px")],
    "folder_image.csv": [(2, "images[1]", "is not a file")],
    "unreadable_path.csv": [(2, "images[1]", "cannot be read")],
    "ftp_scheme.csv": [(2, "images[1]", "scheme 'ftp' is not supported")],
    "file_scheme.csv": [(2, "images[1]", "scheme 'file' is not supported")],
    "bad_s3_uri.csv": [(2, "images[1]", "s3://bucket/key")],
    "bad_url_bracket.csv": [(2, "images[1]", "not a valid URL")],
    "empty_image_item.csv": [(2, "images[2]", "is empty")],
    "nul_in_path.csv": [(3, "images[1]", "NUL")],
    "nul_in_path.jsonl": [(1, "images[2]", "NUL")],
    "internal_url.csv": [(line, "images[1]", "internal address") for line in range(3, 17)],
    "empty_file.csv": [(0, None, "empty")],
    "header_only.csv": [(0, None, "no rows")],
    "non_utf8.csv": [(3, None, "not UTF-8")],
    "invalid_json.jsonl": [(2, None, "invalid JSON at column 28")],
    "not_an_object.jsonl": [(1, None, "must be a JSON object")],
    "jsonl_missing_prompt.jsonl": [(1, "prompt", "is missing")],
    "jsonl_images_string.jsonl": [(1, "images", "must be a list")],
    "jsonl_bad_param_type.jsonl": [(1, "params.seed", "must be int")],
    "jsonl_typo_key.jsonl": [(1, "image", "did you mean 'images'"), (1, "images", "is missing")],
    "many_problems.csv": [
        (3, "id", "not a safe id"),
        (3, "prompt", "is blank"),
        (3, "images", "has no images"),
        (5, "model", "unknown model"),
        (5, "images[1]", "scheme 'ftp'"),
        (5, "images[2]", "file not found"),
    ],
}


def validator(path: Path, **kw: object) -> Validator:
    return Validator(path, ModelTable.load(), **kw)  # type: ignore[arg-type]


def test_the_corpus_is_complete() -> None:
    on_disk = {p.name for p in CORPUS.iterdir() if p.is_file()}
    assert on_disk == set(EXPECTED) and len(on_disk) >= 30


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_bad_manifest_names_line_and_field(name: str) -> None:
    result = validator(CORPUS / name).run()
    got = [(p.line, p.field, p.message) for p in result.problems]
    assert not result.ok
    assert len(got) == len(EXPECTED[name]), got
    for (line, fld, words), (g_line, g_field, g_msg) in zip(EXPECTED[name], got, strict=True):
        assert (g_line, g_field) == (line, fld), got
        assert words in g_msg, got
    assert all(str(p).startswith(str(CORPUS / name)) for p in result.problems)


@pytest.mark.parametrize(
    "name",
    [
        "duplicate_id.csv",
        "many_problems.csv",
        "non_utf8.csv",
        "bad_quoting.csv",
        "nul_in_path.csv",
        "duplicate_id_case.csv",
        "internal_url.csv",
    ],
)
def test_validate_command_exits_non_zero_and_prints_each_problem(name: str) -> None:
    result = CliRunner().invoke(main, ["validate", str(CORPUS / name)])
    assert result.exit_code == EXIT_INVALID
    for line, fld, _ in EXPECTED[name]:
        assert f"{name}:{line}: " + (f"{fld}: " if fld else "") in result.output
    assert "nothing was run" in result.output


def test_estimate_refuses_an_invalid_manifest_unless_told() -> None:
    runner = CliRunner()
    refused = runner.invoke(main, ["estimate", str(CORPUS / "duplicate_id.csv")])
    assert refused.exit_code == EXIT_INVALID and "--skip-invalid" in refused.output
    partial = runner.invoke(main, ["estimate", str(CORPUS / "duplicate_id.csv"), "--skip-invalid", "--json"])
    assert partial.exit_code == 0
    assert json.loads(partial.output[partial.output.index("{") :])["jobs"] == 2


def test_internal_urls_pass_when_the_setting_allows_them() -> None:
    assert validator(CORPUS / "internal_url.csv", allow_internal_urls=True).run().ok
    allowed = CliRunner().invoke(
        main, ["validate", str(CORPUS / "internal_url.csv")], env={"SEEDREAM_ALLOW_INTERNAL_URLS": "1"}
    )
    assert allowed.exit_code == 0 and "15 jobs OK" in allowed.output


@pytest.mark.parametrize(
    "host",
    ["cdn.example.com", "8.8.8.8", "134744072", "0x8.0x8.0x8.0x8", "[2606:4700:4700::1111]", "[::ffff:8.8.8.8]",
     "127.example.com", "0x7f.example.com", "localhost.example.com"],
)  # fmt: skip
def test_public_hosts_in_any_spelling_are_not_internal(host: str) -> None:
    assert not is_internal_host(host)


def test_a_formula_like_metadata_column_stays_valid(tmp_path: Path) -> None:
    """Metadata names come from the user's own sheet: the report defuses them (test_gallery)."""
    shutil.copy(CORPUS / "images" / "good.png", tmp_path / "good.png")
    (tmp_path / "m.csv").write_text('id,prompt,images,"=HYPERLINK(""http://x"",""y"")"\na,p,good.png,v\n')
    [job] = list(validator(tmp_path / "m.csv").jobs())
    assert job.metadata == {'=HYPERLINK("http://x","y")': "v"}


def test_file_over_10_mb_is_refused_without_reading_it(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    with big.open("wb") as fh:
        fh.truncate(11 * 1024 * 1024)  # sparse: no disk, no memory
    (tmp_path / "m.csv").write_text("id,prompt,images\na,hello,big.png\n")
    [problem] = validator(tmp_path / "m.csv").run().problems
    assert (problem.line, problem.field) == (2, "images[1]") and "at most 10 MB" in problem.message


def test_over_long_line_is_reported_and_the_rest_still_read(tmp_path: Path) -> None:
    shutil.copy(CORPUS / "images" / "good.png", tmp_path / "good.png")
    path = tmp_path / "m.jsonl"
    with path.open("w") as fh:
        fh.write(json.dumps({"id": "a", "prompt": "x" * (2 * 1024 * 1024), "images": ["good.png"]}) + "\n")
        fh.write(json.dumps({"id": "b", "prompt": "fine", "images": ["good.png"]}) + "\n")
    result = validator(path).run()
    assert [(p.line, p.field) for p in result.problems] == [(1, None)]
    assert "longer than" in result.problems[0].message and result.jobs == 1


def test_csv_field_over_the_csv_limit_is_malformed(tmp_path: Path) -> None:
    shutil.copy(CORPUS / "images" / "good.png", tmp_path / "good.png")
    (tmp_path / "m.csv").write_text(f"id,prompt,images\na,{'y' * 200_000},good.png\nb,ok,good.png\n")
    result = validator(tmp_path / "m.csv").run()
    assert [(p.line, p.field) for p in result.problems] == [(2, None)]
    assert "field larger than field limit" in result.problems[0].message


def test_valid_csv_with_bom_crlf_multiline_prompt_and_metadata(tmp_path: Path) -> None:
    (tmp_path / "shoe.jpg").write_bytes(image_bytes(40, 30, "JPEG"))
    text = (
        "id,Prompt,images,model,size,params,sku,campaign\r\n"
        'a-1,"line one\r\nline two",shoe.jpg|https://cdn.example.com/x.png,,2048x2048,"{""seed"": 7}",S1,c\r\n'
        "b-2,second,s3://bucket/key/y.webp,bytedance/seedream-v4.5/edit,,,S2,c\r\n"
    )
    (tmp_path / "m.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    jobs = list(validator(tmp_path / "m.csv").jobs())
    assert [j.line for j in jobs] == [2, 4]  # the multi-line prompt takes lines 2-3
    a, b = jobs
    assert a.prompt == "line one\r\nline two" and a.size == "2048*2048" and a.params == {"seed": 7}
    assert [i.kind for i in a.images] == ["local", "url"]
    assert a.images[0].path == str((tmp_path / "shoe.jpg").resolve())
    assert a.metadata == {"sku": "S1", "campaign": "c"} and a.model == V4
    assert b.model == V45 and b.images[0].kind == "s3"


def test_default_model_from_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text('{"id": "a", "prompt": "p", "images": ["https://x.example/a.png"], "sku": 9}\n')
    [job] = list(validator(tmp_path / "m.jsonl", model=V45).jobs())
    assert job.model == V45 and job.metadata == {"sku": 9}


def test_shared_local_images_are_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "p.png").write_bytes(image_bytes())
    (tmp_path / "m.csv").write_text("id,prompt,images\n" + "".join(f"r{i},p{i},p.png\n" for i in range(50)))
    opened: list[str] = []
    real_open = open

    def counting_open(file: object, *args: object, **kw: object) -> object:
        if str(file).endswith("p.png"):
            opened.append(str(file))
        return real_open(file, *args, **kw)  # type: ignore[call-overload]

    monkeypatch.setattr("builtins.open", counting_open)
    assert validator(tmp_path / "m.csv").run().jobs == 50
    assert len(opened) == 1


def test_models_file_overrides_prices_and_adds_models(tmp_path: Path) -> None:
    f = tmp_path / "models.json"
    f.write_text(json.dumps({V4: {"price_usd": "0.03"}, "acme/edit": {"price_usd": 0.01, "min_pixels": 1}}))
    table = ModelTable.load(f)
    assert table.models[V4].price_micros == 30_000 and table.models["acme/edit"].price_micros == 10_000
    assert table.models[V45].price_micros == 36_000


def test_examples_are_valid() -> None:
    root = Path(__file__).parents[1] / "manifests" / "examples"
    catalog = validator(root / "catalog.csv").run()
    assert catalog.ok and catalog.jobs == 12 and set(catalog.by_model) == {V4, V45}
    assert validator(root / "multi-ref.jsonl").run().ok


def test_job_specs_never_carry_unsafe_ids(tmp_path: Path) -> None:
    rows = ["../a", "a/b", "a\\b", ".", "..", "a b", "ä", "=cmd", "x" * 129, ""]
    (tmp_path / "m.jsonl").write_text(
        "".join(json.dumps({"id": r, "prompt": "p", "images": ["https://x.example/a.png"]}) + "\n" for r in rows)
    )
    result = validator(tmp_path / "m.jsonl").run()
    assert result.jobs == 0 and {p.field for p in result.problems} == {"id"}
    assert len(result.problems) == len(rows)  # one problem each, "" included (empty)


def test_validation_is_streaming(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    with path.open("w") as fh:
        fh.write("id,prompt,images\n")
        for i in range(20_000):
            fh.write(f"r{i},prompt {i},https://cdn.example.com/{i}.png\n")
    gen = validator(path).results()
    first = next(gen)
    assert isinstance(first, JobSpec) and first.id == "r0"
    assert os.path.getsize(path) > 500_000


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_run_refuses_every_bad_manifest_before_anything_is_enqueued(
    name: str, tmp_path: Path, redis_url: str, prefix: str
) -> None:
    import redis

    from jobs.config import WorkerSettings
    from jobs.start import ManifestRefused, RunOptions, start_run

    enqueued: list[str] = []

    def enqueue(run_id: str) -> int:
        enqueued.append(run_id)
        return 0

    opts = RunOptions(manifest=CORPUS / name, output=str(tmp_path / "out"), api_base="http://127.0.0.1:9/api/v1")
    with pytest.raises(ManifestRefused):
        start_run(opts, WorkerSettings(redis_url=redis_url, prefix=prefix), enqueue)
    assert enqueued == []
    assert not list(redis.Redis.from_url(redis_url).scan_iter(f"{prefix}:*"))
    assert not (tmp_path / "out").exists()
