"""Malformed inputs: a clear error naming the file and line (or row) and the fix, or, with --skip-bad-records,
skipped and counted in the manifest and the report. `prepare_data`'s text sources go through the same readers."""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stagerun.core.spec.run import SourceSpec
from stagerun.trainer.cli import main
from stagerun.trainer.data import DataError, TokenShards, iter_documents, load_tokenizer, train_tokenizer
from stagerun.trainer.data.tokenize import tokenize

GOOD = ["a good document", "another good one 123"]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(GOOD * 50 + ["Straße café oops text content"] * 20, 300, path)
    return path


def jsonl(*lines: str | bytes) -> bytes:
    return b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


OK_LINE = json.dumps({"text": "fine"})
FIELD_FIX = r"set textField \(--text-field on the command line\) to the field that holds the document text"


@dataclass
class Case:
    name: str
    file: str
    content: bytes
    where: str  # what the message starts with, after the folder
    problem: str  # regex
    fix: str  # regex
    skipped: tuple[int, int]  # (records, files) that --skip-bad-records counts
    kept: int  # good documents of the bad file


CASES = [
    Case(
        "empty-jsonl",
        "empty.jsonl",
        b"",
        "empty.jsonl",
        r"empty file \(0 bytes\)",
        "remove it from the inputs",
        (0, 1),
        0,
    ),
    Case(
        "empty-text", "empty.txt", b"", "empty.txt", r"empty file \(0 bytes\)", "remove it from the inputs", (0, 1), 0
    ),
    Case("empty-parquet", "empty.parquet", b"", "empty.parquet", r"empty file \(0 bytes\)", "remove it", (0, 1), 0),
    Case(
        "latin1-text",
        "latin1.txt",
        "ok\nStraße".encode("latin-1"),
        "latin1.txt",
        r"not UTF-8 text \(invalid byte at offset 7, line 2\)",
        "convert the file to UTF-8",
        (1, 0),
        0,
    ),
    Case(
        "latin1-line",
        "bad.jsonl",
        jsonl(OK_LINE, '{"text": "café"}'.encode("latin-1"), OK_LINE),
        "bad.jsonl:2",
        r"not UTF-8 text \(invalid byte at column 14\)",
        "convert the file to UTF-8, or fix or remove the line",
        (1, 0),
        2,
    ),
    Case(
        "not-json",
        "bad.jsonl",
        jsonl(OK_LINE, OK_LINE, '{"text": oops}'),
        "bad.jsonl:3",
        r"not valid JSON at column 10 \(Expecting value\)",
        "fix or remove the line",
        (1, 0),
        2,
    ),
    Case(
        "missing-field",
        "bad.jsonl",
        jsonl(OK_LINE, '{"content": "x"}', "", OK_LINE),
        "bad.jsonl:2",
        r"no field 'text' in this record \(it has 'content'\)",
        FIELD_FIX,
        (1, 0),
        2,
    ),
    Case(
        "not-an-object",
        "bad.jsonl",
        jsonl("[1, 2]"),
        "bad.jsonl:1",
        "no field 'text' in this record",
        FIELD_FIX,
        (1, 0),
        0,
    ),
    Case(
        "number-field",
        "bad.jsonl",
        jsonl('{"text": 5}', OK_LINE),
        "bad.jsonl:1",
        "field 'text' is int, not a string",
        FIELD_FIX,
        (1, 0),
        1,
    ),
    Case(
        "parquet-no-column",
        "rows.parquet",
        parquet_bytes(pa.table({"body": ["x", "y"]})),
        "rows.parquet",
        r"no column 'text' \(it has 'body'\)",
        FIELD_FIX,
        (0, 1),
        0,
    ),
    Case(
        "parquet-null",
        "rows.parquet",
        parquet_bytes(pa.table({"text": ["x", None, "z"]})),
        "rows.parquet: row 1",
        "'text' is null",
        "fill in the text or drop the row",
        (1, 0),
        2,
    ),
    Case(
        "parquet-ints",
        "rows.parquet",
        parquet_bytes(pa.table({"text": [1, 2]})),
        "rows.parquet",
        "column 'text' holds int64, not strings",
        FIELD_FIX,
        (0, 1),
        0,
    ),
    Case(
        "parquet-latin1-binary",
        "rows.parquet",
        parquet_bytes(pa.table({"text": [b"ok", "Straße".encode("latin-1")]})),
        "rows.parquet: row 1",
        r"not UTF-8 text \(invalid byte at offset 4\)",
        "convert the column to UTF-8",
        (1, 0),
        1,
    ),
    Case(
        "not-parquet",
        "rows.parquet",
        b"this is not parquet at all",
        "rows.parquet",
        r"not a Parquet file \(.*\)",
        "remove it from the inputs",
        (0, 1),
        0,
    ),
]


@pytest.fixture(params=CASES, ids=[c.name for c in CASES])
def case(request, tmp_path):
    case: Case = request.param
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "0-good.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in GOOD))
    (tmp_path / "in" / case.file).write_bytes(case.content)
    return tmp_path, case


def message(tmp_path, case: Case) -> str:
    return re.escape(f"{tmp_path / 'in' / case.where}: ") + case.problem + ": " + case.fix


def test_error_names_file_and_line_and_the_fix(case, tokenizer_path):
    tmp_path, case = case
    with pytest.raises(DataError, match=message(tmp_path, case) + r".*; or rerun with --skip-bad-records"):
        tokenize([str(tmp_path / "in")], tokenizer_path, tmp_path / "out", processes=1, progress=False)
    with pytest.raises(DataError, match="not a complete shard set"):
        TokenShards.open(tmp_path / "out")


def test_skip_bad_records_skips_and_counts(case, tokenizer_path):
    tmp_path, case = case
    result = tokenize(
        [str(tmp_path / "in")], tokenizer_path, tmp_path / "out", processes=1, progress=False, skip_bad_records=True
    )
    info = result.manifest["tokenize"]
    assert (info["skippedRecords"], info["skippedFiles"]) == case.skipped
    assert (info["inputs"][0]["skippedRecords"], info["inputs"][0]["skippedFiles"]) == case.skipped
    (example,) = info["skipped"]
    assert example["where"] == str(tmp_path / "in" / case.where)
    assert re.fullmatch(case.problem, example["problem"])
    assert result.manifest["numDocuments"] == len(GOOD) + case.kept
    assert TokenShards.open(tmp_path / "out").num_documents == len(GOOD) + case.kept
    assert "skipped:" in result.report() and example["where"] in result.report()


def test_prepare_data_reads_with_the_same_errors(case):
    """A run's text source fails the same way (without the --skip-bad-records hint: a run has no such option)."""
    tmp_path, case = case
    with pytest.raises(DataError, match=message(tmp_path, case)) as error:
        list(iter_documents(SourceSpec(path=str(tmp_path / "in"), weight=1)))
    assert "--skip-bad-records" not in str(error.value)


def test_line_numbers_are_absolute_in_split_files(tokenizer_path, tmp_path):
    lines = [json.dumps({"text": f"document {i} " * 5}) for i in range(1000)]
    lines[777] = '{"text": "unterminated'
    (tmp_path / "big.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"big\.jsonl:778: not valid JSON"):
        tokenize(
            [str(tmp_path / "big.jsonl")],
            tokenizer_path,
            tmp_path / "out",
            processes=1,
            unit_bytes=4096,
            progress=False,
        )
    result = tokenize(
        [str(tmp_path / "big.jsonl")],
        tokenizer_path,
        tmp_path / "out",
        processes=1,
        unit_bytes=4096,
        progress=False,
        skip_bad_records=True,
    )
    assert result.units > 10
    assert result.manifest["tokenize"]["skipped"] == [
        {
            "where": f"{tmp_path / 'big.jsonl'}:778",
            "problem": "not valid JSON at column 10 (Unterminated string starting at)",
        }
    ]
    assert result.manifest["numDocuments"] == 999


def test_worker_error_stops_the_run_and_a_fixed_input_resumes(tokenizer_path, tmp_path):
    """With worker processes, the first malformed record stops the run with its file and line; after fixing the
    file, rerunning the same command finishes (units committed before the error are kept)."""
    for i in range(6):
        lines = [json.dumps({"text": f"file {i} document {j}"}) for j in range(200)]
        if i == 5:
            lines[150] = "not json"
        (tmp_path / f"part-{i}.jsonl").write_text("\n".join(lines) + "\n")
    inputs = [str(tmp_path / "part-*.jsonl")]
    with pytest.raises(DataError, match=r"part-5\.jsonl:151: not valid JSON"):
        tokenize(inputs, tokenizer_path, tmp_path / "out", processes=2, unit_bytes=2048, progress=False)
    fixed = (tmp_path / "part-5.jsonl").read_text().replace("not json", json.dumps({"text": "fixed"}))
    (tmp_path / "part-5.jsonl").write_text(fixed)
    result = tokenize(inputs, tokenizer_path, tmp_path / "out", processes=2, unit_bytes=2048, progress=False)
    assert result.manifest["numDocuments"] == 1200
    shards = TokenShards.open(tmp_path / "out")
    tokenizer = load_tokenizer(tokenizer_path)
    last = tokenizer.decode(shards.read(int(shards.doc_ends[-2]), int(shards.doc_ends[-1]) - 1).tolist())
    assert last == "file 5 document 199"


def test_a_shard_whose_size_disagrees_with_the_manifest(tokenizer_path, tmp_path):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in GOOD * 20))
    result = tokenize([str(tmp_path / "a.jsonl")], tokenizer_path, tmp_path / "out", processes=1, progress=False)
    shard = result.manifest["shards"][0]
    path = tmp_path / "out" / shard["tokens"]
    path.write_bytes(path.read_bytes() + b"\0\0")
    expected = (
        rf"{re.escape(shard['tokens'])}: {shard['numTokens'] * 2 + 2} bytes, expected "
        rf"{shard['numTokens'] * 2} \({shard['numTokens']} uint16 tokens, as manifest.json shards\[0\] says\); "
        r"the file is truncated or from another set: re-create the shard set"
    )
    with pytest.raises(DataError, match=expected):
        TokenShards.open(tmp_path / "out")
    index = tmp_path / "out" / shard["index"]
    path.write_bytes(path.read_bytes()[:-2])
    index.write_bytes(np.fromfile(index, dtype="<i8")[:-1].tobytes())
    with pytest.raises(
        DataError,
        match=rf"{re.escape(shard['index'])}: \d+ bytes, expected \d+ "
        rf"\({shard['numDocuments']} int64 document ends",
    ):
        TokenShards.open(tmp_path / "out")


def test_cli_reports_errors_and_skips(tokenizer_path, tmp_path):
    (tmp_path / "bad.jsonl").write_text(jsonl(OK_LINE, "{oops", OK_LINE).decode())
    argv = [
        "tokenize",
        "--input",
        str(tmp_path / "bad.jsonl"),
        "--tokenizer",
        str(tokenizer_path),
        "--out",
        str(tmp_path / "out"),
        "--processes",
        "1",
        "--no-progress",
    ]
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert main(argv) == 1
    assert re.search(r"error: .*bad\.jsonl:2: not valid JSON .*--skip-bad-records", err.getvalue())
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        assert main([*argv, "--skip-bad-records"]) == 0
    assert re.search(
        r"skipped: 1 malformed records and 0 files \(first 1: .*bad\.jsonl:2: not valid JSON", out.getvalue()
    )
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(
            [
                "tokenizer",
                "train",
                "--input",
                str(tmp_path / "bad.jsonl"),
                "--vocab-size",
                "300",
                "--out",
                str(tmp_path / "tok.json"),
                "--no-progress",
            ]
        )
    assert code == 1 and re.search(r"bad\.jsonl:2: not valid JSON", err.getvalue())
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(io.StringIO()):
        assert (
            main(
                [
                    "tokenizer",
                    "train",
                    "--input",
                    str(tmp_path / "bad.jsonl"),
                    "--vocab-size",
                    "300",
                    "--out",
                    str(tmp_path / "tok.json"),
                    "--no-progress",
                    "--skip-bad-records",
                ]
            )
            == 0
        )
    assert "skipped: 1 malformed records" in out.getvalue()


def test_no_documents_at_all_is_an_error(tokenizer_path, tmp_path):
    (tmp_path / "a.jsonl").write_text(jsonl('{"text": ""}', '{"body": "x"}').decode())
    with pytest.raises(
        DataError,
        match=r"the inputs hold no documents \(1 malformed records and 0 files skipped, "
        r"1 empty texts\): check --input, --format and --text-field",
    ):
        tokenize(
            [str(tmp_path / "a.jsonl")],
            tokenizer_path,
            tmp_path / "out",
            processes=1,
            progress=False,
            skip_bad_records=True,
        )
