"""The embedded default's SQLite under concurrent writes: admin saves while a fine-tune trains
in the server process (`manage.py runserver`, as `make serve` runs it).

Before WAL, IMMEDIATE transactions and a busy timeout, an admin save answered 500
"database is locked" here: the training thread's writes
(progress, heartbeat, logs, checkpoints) and a save's read-then-write transaction
deadlocked, and SQLite refuses such a transaction at once instead of waiting.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from tests.reliability.test_promised_behaviours import EmbeddedServer, logged_in_browser

pytestmark = [pytest.mark.reliability, pytest.mark.pipeline]

WRITERS = 4
# Long enough to be written to for a while: ~40 optimizer steps of the tiny model.
TRAINING = {
    "name": "trains-while-admin-writes", "kind": "finetune", "model": {"base": "local:tiny-llama"},
    "datasets": {"train": ["rag_qa_train"], "eval": ["ragas_eval"]},
    "training": {"epochs": 1, "batch_size": 4, "max_seq_length": 128, "max_truncated_fraction": 1.0, "learning_rate": 1e-3, "max_steps": 40,
                 "eval_every": 5, "checkpoint_every": 5, "seed": 7},
    "evaluation": {"metrics": ["rouge_score"], "max_samples": 2, "max_new_tokens": 4, "compare_base": False},
}


@pytest.fixture
def embedded_server(tmp_path, tiny_model) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def csrf_token(session: requests.Session, url: str) -> str:
    page = session.get(url, timeout=60)
    assert page.status_code == 200, (url, page.status_code)
    return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)


def admin_writes(server: EmbeddedServer, writer: int, dataset_id: int, until: threading.Event, outcomes: list) -> None:
    """Save a dataset's description and add a user through the admin, again and again, until told to stop."""
    session = logged_in_browser(server)
    change = f"{server.url}/admin/datasets_app/dataset/{dataset_id}/change/"
    add_user = f"{server.url}/admin/auth/user/add/"
    n = 0
    while not until.is_set():
        n += 1
        for url, form in (
            (change, {"description": f"edited by writer {writer}, save {n}"}),
            (add_user, {"username": f"w{writer}-{n}", "password1": "a-long-enough-passphrase-1", "password2": "a-long-enough-passphrase-1",
                        "usable_password": "true"}),
        ):
            token = csrf_token(session, url)
            started = time.monotonic()
            answer = session.post(url, data={**form, "csrfmiddlewaretoken": token}, headers={"Referer": url}, allow_redirects=False, timeout=120)
            outcomes.append((url.rsplit("/admin/", 1)[1], answer.status_code, time.monotonic() - started, answer.text[:300]))


@pytest.mark.timeout(900)
def test_admin_saves_succeed_while_a_fine_tune_trains_in_the_server_process(embedded_server, ledger):
    entry = ledger.record(
        "fault", f"{WRITERS} threads saving through the admin while a fine-tune trains in the runserver process (embedded SQLite)",
        "every admin save answers 302 (never 500 'database is locked'), each one is stored, the run completes; the database is in WAL mode",
    )
    server = embedded_server
    api = server.api
    created = api.post(f"{server.url}/api/runs/", json=TRAINING, timeout=60)
    assert created.status_code == 201, created.text
    run_id = created.json()["id"]
    dataset_id = next(d["id"] for d in api.get(f"{server.url}/api/datasets/?type=train", timeout=30).json()["results"] if d["name"] == "rag_qa_train")

    deadline = time.monotonic() + 300
    while (status := server.run(run_id)["status"]) == "pending":
        assert time.monotonic() < deadline, server.logs()
        time.sleep(0.2)
    assert status == "training", server.run(run_id)

    stop, outcomes = threading.Event(), []
    writers = [threading.Thread(target=admin_writes, args=(server, i, dataset_id, stop, outcomes)) for i in range(WRITERS)]
    for thread in writers:
        thread.start()
    saves_while_training = 0
    try:
        while server.run(run_id)["status"] == "training":
            saves_while_training = len(outcomes)
            assert time.monotonic() < deadline + 300, server.logs()
            time.sleep(0.5)
    finally:
        stop.set()
        for thread in writers:
            thread.join(timeout=180)

    refused = [o for o in outcomes if o[1] != 302]
    assert not refused, f"{len(refused)} of {len(outcomes)} admin saves refused: {refused[:3]}\n{server.logs()}"
    assert saves_while_training >= 2 * WRITERS, f"only {saves_while_training} saves landed while the run trained"
    deadline = time.monotonic() + 300
    while (run := server.run(run_id))["status"] not in {"completed", "failed", "cancelled"}:
        assert time.monotonic() < deadline, server.logs()
        time.sleep(1)
    assert run["status"] == "completed", f"{run['error']}\n{run['logs'][-2000:]}"

    database = server.root / "var" / "db.sqlite3"
    with sqlite3.connect(database) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        users = db.execute("SELECT count(*) FROM auth_user WHERE username LIKE 'w%-%'").fetchone()[0]
    assert users == sum(1 for o in outcomes if o[0] == "auth/user/add/")
    slowest = max(o[2] for o in outcomes)
    entry.verified += f" ({len(outcomes)} saves, {saves_while_training} while training; slowest {slowest:.2f} s)"
