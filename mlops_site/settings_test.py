"""Test settings: the real settings module, pointed at a throwaway var/ directory.

Everything else (DATABASE_URL for PostgreSQL, ...) comes from the environment
exactly as in production. REDIS_URL is moved aside so that runs created by
tests stay inline unless a test starts real workers (tests/conftest.py).
"""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("MLOPS_VAR_DIR", tempfile.mkdtemp(prefix="mlops-test-"))
# The offline model is deterministic: build it once and reuse it across test sessions.
os.environ.setdefault("MLOPS_MODELS_DIR", str(Path(__file__).resolve().parent.parent / "var" / "models"))
if "REDIS_URL" in os.environ:
    os.environ.setdefault("TEST_REDIS_URL", os.environ.pop("REDIS_URL"))
os.environ.pop("MLFLOW_TRACKING_URI", None)
# No network in tests: a hub id is resolved against the local Hugging Face cache only (runs/model_refs.py),
# as under the Makefile, whichever way pytest was started.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .settings import *  # noqa: E402,F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast test logins

if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":  # noqa: F405
    # A file, not memory: worker subprocesses started by tests must see the same database.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test-db.sqlite3")}  # noqa: F405
