import io
import json

import pytest

from datasets_app.validation import MAX_REPORTED_PROBLEMS, validate_jsonl

TRAIN_ROW = {"question": "Q?", "answer": "A.", "context": "C."}
EVAL_ROW = {"question": "Q?", "answer": "A.", "contexts": ["C1", "C2"], "ground_truth": "G."}


def jsonl(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def check(data: bytes, kind="train", max_bytes=10_000_000):
    return validate_jsonl(io.BytesIO(data), kind=kind, max_bytes=max_bytes)


def test_it_counts_rows_and_hashes_a_valid_file():
    import hashlib

    data = jsonl(TRAIN_ROW, TRAIN_ROW)
    report = check(data)
    assert report.ok
    assert report.row_count == 2
    assert report.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize(
    ("line", "kind", "expected"),
    [
        (b"{not json", "train", "line 2: invalid JSON"),
        (json.dumps({"question": "Q", "answer": "A"}).encode(), "train", "line 2: missing field 'context'"),
        (json.dumps({**TRAIN_ROW, "answer": "  "}).encode(), "train", "line 2: field 'answer' is empty"),
        (json.dumps({**TRAIN_ROW, "answer": 3}).encode(), "train", "line 2: field 'answer' must be a string, got int"),
        (json.dumps([1, 2]).encode(), "train", "line 2: expected a JSON object, got list"),
        (json.dumps({**EVAL_ROW, "contexts": "one"}).encode(), "eval", "line 2: field 'contexts' must be a list of strings"),
        (json.dumps({**EVAL_ROW, "contexts": [1, 2]}).encode(), "eval", "line 2: field 'contexts' must be a list of strings"),
        (json.dumps({**EVAL_ROW, "contexts": []}).encode(), "eval", "line 2: field 'contexts' must hold at least one"),
        (json.dumps({**TRAIN_ROW, "extra": 1}).encode(), "train", "line 2: unknown field(s) 'extra'"),
        (b"", "train", "line 2: empty line"),
        (b"\xff\xfe{}", "train", "line 2: not valid UTF-8"),
        (b'{"a":\x00}', "train", "line 2: contains a NUL byte"),
    ],
)
def test_it_names_the_line_and_the_problem(line, kind, expected):
    good = TRAIN_ROW if kind == "train" else EVAL_ROW
    report = check(jsonl(good, line, good), kind=kind)
    assert not report.ok
    assert any(p.startswith(expected) for p in report.problems), report.problems
    assert report.row_count == 2


def test_it_accepts_a_utf8_bom_and_optional_reference_contexts():
    row = {**EVAL_ROW, "reference_contexts": ["C1"]}
    assert check(b"\xef\xbb\xbf" + jsonl(row), kind="eval").ok


def test_it_refuses_an_empty_file():
    report = check(b"")
    assert report.problems == ["file is empty"]


def test_it_refuses_a_file_over_the_limit():
    report = check(jsonl(*[TRAIN_ROW] * 100), max_bytes=500)
    assert not report.ok
    assert "larger than the limit of 500 bytes" in report.summary()


def test_it_reports_at_most_twenty_problems_and_counts_the_rest():
    report = check(b"{bad\n" * 30)
    assert len(report.problems) == MAX_REPORTED_PROBLEMS
    assert report.problem_count == 30
    assert report.summary().endswith("(and 10 more)")
