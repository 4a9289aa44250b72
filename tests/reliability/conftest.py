"""The reliability ledger: every fault injected, hostile input tried and fuzz case
run is recorded with what was verified, and `make reliability` (or any pytest run
that includes tests/reliability) prints the table at the end.

Use the `ledger` fixture:

    ledger.record("fault", "SIGKILL work-horse mid-training", "run failed with reason; nothing left running")
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

CATEGORIES = ("fault", "hostile input", "fuzz", "security")


@dataclass
class Entry:
    category: str
    case: str
    verified: str
    test: str
    outcome: str = "pending"


class Ledger:
    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.current_test = ""

    def record(self, category: str, case: str, verified: str) -> Entry:
        if category not in CATEGORIES:
            raise ValueError(f"category must be one of {CATEGORIES}")
        entry = Entry(category, case, verified, self.current_test)
        self.entries.append(entry)
        return entry


LEDGER = Ledger()


@pytest.fixture
def ledger(request) -> Ledger:
    LEDGER.current_test = request.node.nodeid
    return LEDGER


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" or (report.when == "setup" and report.failed):
        for entry in LEDGER.entries:
            if entry.test == item.nodeid and entry.outcome == "pending":
                entry.outcome = "ok" if report.passed else "FAILED"


def pytest_terminal_summary(terminalreporter) -> None:
    if not LEDGER.entries:
        return
    write = terminalreporter.write_line
    write("")
    write("Reliability ledger: what was injected or tried, and what was verified")
    width = max(len(e.case) for e in LEDGER.entries)
    for category in CATEGORIES:
        rows = [e for e in LEDGER.entries if e.category == category]
        if not rows:
            continue
        ok = sum(e.outcome == "ok" for e in rows)
        write(f"  {category}: {len(rows)} cases, {ok} verified")
        for e in rows:
            write(f"    [{e.outcome:6}] {e.case.ljust(width)}  {e.verified}")
    total = len(LEDGER.entries)
    verified = sum(e.outcome == "ok" for e in LEDGER.entries)
    write(f"  total: {total} cases, {verified} verified, {total - verified} not verified")
