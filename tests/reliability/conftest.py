"""The reliability ledger: every fault injected, hostile input tried and fuzz case
run is recorded with what its assertions check, and `make reliability` (or any
pytest run that includes tests/reliability) prints the table at the end.

Use the `ledger` fixture in the test body:

    ledger.record("fault", "SIGKILL work-horse mid-training", "run failed with reason; nothing left running")

The `verified` text says what the test's assertions check, no more. A row's
outcome comes from the test's own result, never from the test itself: `ok` only
when the test passed, `FAILED` when it failed, and `not verified: <why>` when it
was skipped. A test that can be skipped before its body runs (a skipif mark)
declares its rows with the `ledger` mark, so the skip still leaves a row:

    @pytest.mark.ledger("fault", "database drop mid-job", "the run ends failed with the reason")
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

CATEGORIES = ("fault", "hostile input", "fuzz", "security")
# A skipped test that declared no row still shows, under the category of its module.
MODULE_CATEGORIES = {"test_faults_": "fault", "test_hostile_": "hostile input", "test_api_fuzz": "fuzz", "test_security": "security"}


@dataclass
class Entry:
    category: str
    case: str
    verified: str
    test: str
    outcome: str = "pending"

    @property
    def is_verified(self) -> bool:
        return self.outcome == "ok"


class Ledger:
    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.current_test = ""

    def record(self, category: str, case: str, verified: str, *, test: str | None = None) -> Entry:
        if category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES}")
        if not verified.strip():
            raise ValueError("say what the assertions check")
        entry = Entry(category, case, verified, test or self.current_test)
        self.entries.append(entry)
        return entry

    def of(self, nodeid: str) -> list[Entry]:
        return [e for e in self.entries if e.test == nodeid]


LEDGER = Ledger()


@pytest.fixture
def ledger(request) -> Ledger:
    LEDGER.current_test = request.node.nodeid
    return LEDGER


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "ledger(category, case, verified): a ledger row declared up front (kept when the test is skipped)")


def _declared_rows(item) -> None:
    if LEDGER.of(item.nodeid):
        return
    for mark in item.iter_markers("ledger"):
        LEDGER.record(*mark.args, test=item.nodeid)


def _skip_reason(report) -> str:
    if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return str(report.longrepr or "skipped")


def _module_category(item) -> str | None:
    name = item.module.__name__.rsplit(".", 1)[-1] if getattr(item, "module", None) else ""
    return next((category for prefix, category in MODULE_CATEGORIES.items() if name.startswith(prefix)), None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "setup":
        _declared_rows(item)
    pending = [e for e in LEDGER.of(item.nodeid) if e.outcome == "pending"]
    if report.skipped:
        reason = f"not verified: {_skip_reason(report)}"
        if not LEDGER.of(item.nodeid) and (category := _module_category(item)):
            LEDGER.record(category, item.name, "(the test did not run)", test=item.nodeid).outcome = reason
        for entry in pending:
            entry.outcome = reason
    elif report.failed:
        if not LEDGER.of(item.nodeid) and (category := _module_category(item)):  # it failed before recording its row
            LEDGER.record(category, item.name, "(failed before recording what it checks)", test=item.nodeid)
        for entry in LEDGER.of(item.nodeid):
            if entry.outcome in ("pending", "ok"):  # a teardown failure undoes a pass
                entry.outcome = "FAILED"
    elif report.when == "call":
        for entry in pending:
            entry.outcome = "ok"


def pytest_terminal_summary(terminalreporter) -> None:
    if not LEDGER.entries:
        return
    write = terminalreporter.write_line
    write("")
    write("Reliability ledger: what was injected or tried, and what the assertions checked")
    width = max(len(e.case) for e in LEDGER.entries)
    for category in CATEGORIES:
        rows = [e for e in LEDGER.entries if e.category == category]
        if not rows:
            continue
        write(f"  {category}: {len(rows)} cases, {sum(e.is_verified for e in rows)} verified")
        for e in rows:
            if e.is_verified:
                write(f"    [ok    ] {e.case.ljust(width)}  {e.verified}")
            else:
                write(f"    [{'FAILED' if e.outcome == 'FAILED' else 'NOT OK'}] {e.case.ljust(width)}  {e.verified}  -- {e.outcome}")
    total = len(LEDGER.entries)
    verified = sum(e.is_verified for e in LEDGER.entries)
    write(f"  total: {total} cases, {verified} verified, {total - verified} not verified")
