"""`make superuser` without a terminal: a clear failure, or the account from DJANGO_SUPERUSER_* (as createsuperuser --noinput)."""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT


def make_superuser(var_dir: Path, **env: str) -> subprocess.CompletedProcess:
    venv = str(Path(sys.prefix))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_SUPERUSER_") and k not in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE")}
    return subprocess.run(
        # -o: the virtual environment is the one running these tests; never reinstall it here.
        ["make", "--no-print-directory", "-o", f"{venv}/.installed", "superuser", f"VENV={venv}"],
        cwd=ROOT, env={**clean, "MLOPS_VAR_DIR": str(var_dir), **env}, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300,
    )


def test_without_a_terminal_it_fails_and_says_what_to_set(tmp_path):
    done = make_superuser(tmp_path)
    assert done.returncode != 0
    assert "no terminal" in done.stderr and "DJANGO_SUPERUSER_PASSWORD" in done.stderr and "skipped" not in done.stdout + done.stderr
    half = make_superuser(tmp_path, DJANGO_SUPERUSER_PASSWORD="a-long-enough-passphrase")
    assert half.returncode != 0 and "DJANGO_SUPERUSER_USERNAME is not" in half.stderr


def test_without_a_terminal_it_reads_the_account_from_the_environment(tmp_path):
    done = make_superuser(tmp_path, DJANGO_SUPERUSER_USERNAME="ops", DJANGO_SUPERUSER_PASSWORD="a-long-enough-passphrase")
    assert done.returncode == 0, done.stdout + done.stderr
    with sqlite3.connect(tmp_path / "db.sqlite3") as db:
        assert db.execute("SELECT username, is_superuser, email FROM auth_user").fetchall() == [("ops", 1, "")]
    again = make_superuser(tmp_path, DJANGO_SUPERUSER_USERNAME="ops", DJANGO_SUPERUSER_PASSWORD="a-long-enough-passphrase")
    assert again.returncode != 0 and "already taken" in again.stderr
