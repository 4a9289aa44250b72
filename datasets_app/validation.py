"""Line-by-line validation of JSONL datasets.

One validator for every way a dataset arrives (API upload, page upload, admin,
`manage.py import_dataset`, seeding), so the same file gets the same verdict.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

from mlops_site.limits import StructureLimitError, check_structure

MAX_REPORTED_PROBLEMS = 20
# One row is a question, an answer and a few passages: a line past this is a
# mistake or an attack, refused without parsing it.
MAX_LINE_BYTES = 1024 * 1024

# Field -> expected kind, per dataset type. "str" must be a non-empty string,
# "str_list" a non-empty list of non-empty strings.
SCHEMAS: dict[str, dict[str, str]] = {
    "train": {"question": "str", "answer": "str", "context": "str"},
    "eval": {"question": "str", "answer": "str", "contexts": "str_list", "ground_truth": "str"},
}
# Optional fields: eval rows may name which of their contexts are the relevant
# ones (the non-LLM context precision/recall references); without them the
# ground truth serves as the reference.
OPTIONAL_FIELDS: dict[str, dict[str, str]] = {
    "train": {},
    "eval": {"reference_contexts": "str_list"},
}


@dataclass
class ValidationReport:
    row_count: int = 0
    size_bytes: int = 0
    sha256: str = ""
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def add(self, problem: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_REPORTED_PROBLEMS:
            self.problems.append(problem)

    def summary(self) -> str:
        more = self.problem_count - len(self.problems)
        tail = f" (and {more} more)" if more > 0 else ""
        return "; ".join(self.problems) + tail


class DatasetTooLarge(Exception):
    pass


def _read_lines(fileobj: IO[bytes], max_bytes: int, report: ValidationReport) -> Iterator[tuple[int, bytes]]:
    digest = hashlib.sha256()
    number = 0
    # Django's UploadedFile and plain binary files both iterate by line; reading
    # bytes keeps the encoding check ours, not the platform's.
    for number, raw in enumerate(fileobj, start=1):
        report.size_bytes += len(raw)
        if report.size_bytes > max_bytes:
            raise DatasetTooLarge(f"file is larger than the limit of {max_bytes} bytes")
        digest.update(raw)
        yield number, raw
    report.sha256 = digest.hexdigest()


def check_row(obj: Any, kind: str) -> list[str]:
    """Problems with one parsed row (empty when it is fine)."""
    if not isinstance(obj, dict):
        return [f"expected a JSON object, got {type(obj).__name__}"]
    schema = SCHEMAS[kind]
    optional = OPTIONAL_FIELDS[kind]
    problems = []
    for name, expected in {**schema, **optional}.items():
        if name not in obj:
            if name not in optional:
                problems.append(f"missing field '{name}'")
            continue
        value = obj[name]
        if expected == "str":
            if not isinstance(value, str):
                problems.append(f"field '{name}' must be a string, got {type(value).__name__}")
            elif not value.strip():
                problems.append(f"field '{name}' is empty")
        elif expected == "str_list":
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                problems.append(f"field '{name}' must be a list of strings")
            elif not value or not all(item.strip() for item in value):
                problems.append(f"field '{name}' must hold at least one non-empty string and no empty ones")
    extra = sorted(set(obj) - set(schema) - set(optional))
    if extra:
        problems.append(f"unknown field(s) {', '.join(repr(e) for e in extra)} (expected {', '.join(schema)})")
    return problems


def validate_jsonl(fileobj: IO[bytes], *, kind: str, max_bytes: int, max_line_bytes: int = MAX_LINE_BYTES) -> ValidationReport:
    """Read the whole file once: counts rows, hashes it and collects line-numbered problems."""
    if kind not in SCHEMAS:
        raise ValueError(f"unknown dataset type {kind!r}")
    report = ValidationReport()
    try:
        for number, raw in _read_lines(fileobj, max_bytes, report):
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # A UTF-8 byte-order mark is harmless: accept it.
            if len(raw) > max_line_bytes:
                report.add(f"line {number}: longer than {max_line_bytes} bytes ({len(raw)} bytes)")
                continue
            if b"\x00" in raw:
                report.add(f"line {number}: contains a NUL byte (binary file?)")
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                report.add(f"line {number}: not valid UTF-8 (byte {exc.start})")
                continue
            if not text.strip():
                report.add(f"line {number}: empty line")
                continue
            try:
                check_structure(text, syntax="json", max_bytes=max_line_bytes, source=f"line {number}")
            except StructureLimitError as exc:
                report.add(str(exc))
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                # Some of json's messages end in "at" already ("Unterminated string starting at").
                where = "column" if exc.msg.endswith(" at") else "at column"
                report.add(f"line {number}: invalid JSON ({exc.msg} {where} {exc.colno})")
                continue
            row_problems = check_row(obj, kind)
            for problem in row_problems:
                report.add(f"line {number}: {problem}")
            if not row_problems:
                report.row_count += 1
    except DatasetTooLarge as exc:
        report.add(str(exc))
        return report
    if report.size_bytes == 0:
        report.add("file is empty")
    return report


def read_rows(path: str, *, limit: int | None = None) -> list[dict[str, Any]]:
    """Rows of a stored (already validated) dataset file."""
    rows = []
    with open(path, encoding="utf-8-sig") as handle:
        for line in handle:
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                rows.append(json.loads(line))
    return rows
