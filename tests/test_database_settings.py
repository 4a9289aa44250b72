"""The embedded default's SQLite is set up for concurrent writers (the end-to-end check,
admin saves during a fine-tune, is tests/reliability/test_faults_sqlite_writes.py)."""

import pytest
from django.db import connection, transaction

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.mark.skipif(connection.vendor != "sqlite", reason="the embedded default's database only")
def test_sqlite_runs_in_wal_mode_with_a_busy_timeout_and_immediate_transactions():
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA journal_mode")
        assert cursor.fetchone()[0] == "wal"
        cursor.execute("PRAGMA busy_timeout")
        assert cursor.fetchone()[0] >= 10_000  # milliseconds
        cursor.execute("PRAGMA synchronous")
        assert cursor.fetchone()[0] == 1  # NORMAL: safe under WAL, far fewer fsyncs
    # A transaction holds the write lock from its BEGIN: it never has to upgrade a read lock (which deadlocks).
    with transaction.atomic():
        assert connection.in_atomic_block
        assert connection.transaction_mode == "IMMEDIATE"
