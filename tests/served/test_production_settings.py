"""Production settings: what `manage.py` does with the environment docker-compose.yml gives it.

Each check runs in a fresh process, as a container would, with the documented
production environment: .env.example (secrets filled in) plus what compose sets.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .compose_helpers import ROOT, env_example, service_environment

SECRETS = ("SECRET_KEY", "POSTGRES_PASSWORD", "REDIS_PASSWORD")


def production_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    """The web container's environment, with its paths moved under tmp_path."""
    import secrets

    values, _ = env_example()
    values.update({name: secrets.token_urlsafe(50) for name in SECRETS})
    container = service_environment("web", values)
    container.update({
        "MLOPS_VAR_DIR": str(tmp_path / "var"),
        "MLOPS_DATA_DIR": str(tmp_path / "var/data"),
        "MLOPS_MODELS_DIR": str(tmp_path / "var/models"),
        "HF_HOME": str(tmp_path / "hf-cache"),
        "STATIC_ROOT": str(tmp_path / "static"),
    })
    base = {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "TMPDIR") if key in os.environ}
    return {**base, **container, **overrides}


def manage(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_check_deploy_is_clean_with_the_documented_production_environment(tmp_path):
    env = production_env(tmp_path)
    assert env["MLOPS_PRODUCTION"] == "true" and "DEBUG" not in env
    result = manage(env, "check", "--deploy", "--fail-level", "WARNING")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_production_settings_are_strict(tmp_path):
    env = production_env(tmp_path)
    code = (
        "import django; django.setup(); from django.conf import settings as s; import json; print(json.dumps({"
        "'debug': s.DEBUG, 'session': s.SESSION_COOKIE_SECURE, 'csrf': s.CSRF_COOKIE_SECURE, 'redirect': s.SECURE_SSL_REDIRECT,"
        "'hsts': s.SECURE_HSTS_SECONDS, 'proxy': list(getattr(s, 'SECURE_PROXY_SSL_HEADER', None) or []),"
        "'hosts': s.ALLOWED_HOSTS, 'static': s.STORAGES['staticfiles']['BACKEND'], 'whitenoise': 'whitenoise.middleware.WhiteNoiseMiddleware' in s.MIDDLEWARE,"
        "'log': s.LOGGING['handlers']['stdout']['formatter']}))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    values = json.loads(result.stdout.strip().splitlines()[-1])
    assert values == {
        "debug": False, "session": True, "csrf": True, "redirect": True, "hsts": 31536000,
        "proxy": ["HTTP_X_FORWARDED_PROTO", "https"], "hosts": ["platform.example.com"],
        "static": "whitenoise.storage.CompressedManifestStaticFilesStorage", "whitenoise": True, "log": "json",
    }


def test_production_refuses_to_start_without_a_secret_key(tmp_path):
    result = manage(production_env(tmp_path, SECRET_KEY=""), "check")
    assert result.returncode != 0
    assert "SECRET_KEY must be set in production" in result.stderr
    assert not (tmp_path / "var" / "secret_key").exists()  # and no key was made up instead


def test_json_logs_are_one_object_per_line_on_stdout(tmp_path):
    env = production_env(tmp_path, LOG_FORMAT="json")
    code = (
        "import django, logging; django.setup()\n"
        "logging.getLogger('runs.test').warning('run %s lost', 7, extra={'run_id': 7})\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError:\n    logging.getLogger('runs.test').exception('boom')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "run 7 lost" not in result.stderr
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert first["message"] == "run 7 lost" and first["level"] == "WARNING" and first["logger"] == "runs.test"
    assert first["run_id"] == 7 and first["time"].endswith("+00:00")
    assert second["level"] == "ERROR" and "ZeroDivisionError" in second["exc_info"]


def test_an_unknown_log_format_is_refused(tmp_path):
    result = manage(production_env(tmp_path, LOG_FORMAT="xml"), "check")
    assert result.returncode != 0 and "LOG_FORMAT must be plain or json" in result.stderr


def test_collectstatic_builds_hashed_compressed_files_offline(tmp_path):
    env = production_env(tmp_path)
    result = manage(env, "collectstatic", "--noinput")
    assert result.returncode == 0, result.stderr
    static = Path(env["STATIC_ROOT"])
    manifest = json.loads((static / "staticfiles.json").read_text())["paths"]
    hashed = manifest["admin/css/base.css"]
    assert hashed != "admin/css/base.css" and (static / hashed).is_file() and (static / f"{hashed}.gz").is_file()
