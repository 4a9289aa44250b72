"""One settings module, driven by environment variables with safe local defaults.

Every variable is documented in README.md ("Configuration"). With none set, the
project runs on the embedded default: SQLite, jobs inline, a local MLflow store
under var/. Production values come from the environment, never from a file that
the tests do not load.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def envbool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    if value.lower() in {"1", "true", "yes", "on"}:
        return True
    if value.lower() in {"0", "false", "no", "off"}:
        return False
    raise ImproperlyConfigured(f"{name} must be true or false, got {value!r}")


def envint(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}") from None


def envlist(name: str, default: list[str]) -> list[str]:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return [item.strip() for item in value.split(",") if item.strip()]


DEBUG = envbool("DEBUG", False)
# Production (docker-compose.yml, .env.example): SECRET_KEY required, secure cookies,
# HSTS, SSL redirect and hashed static files on by default (see "Security" below).
PRODUCTION = envbool("MLOPS_PRODUCTION", False)

# No usable default secret: a local, non-DEBUG run gets a key generated once and
# kept under var/ (never committed); production must set SECRET_KEY.
VAR_DIR = Path(os.environ.get("MLOPS_VAR_DIR", BASE_DIR / "var"))
SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if PRODUCTION:
        raise ImproperlyConfigured("SECRET_KEY must be set in production (MLOPS_PRODUCTION=true)")
    _key_file = VAR_DIR / "secret_key"
    if _key_file.exists():
        SECRET_KEY = _key_file.read_text().strip()
    else:
        from django.core.management.utils import get_random_secret_key

        VAR_DIR.mkdir(parents=True, exist_ok=True)
        SECRET_KEY = get_random_secret_key()
        _key_file.write_text(SECRET_KEY)
        _key_file.chmod(0o600)

ALLOWED_HOSTS = envlist("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = envlist("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    # runserver hands static files to WhiteNoise with DEBUG on too: one way to serve them.
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "django_htmx",
    "django_rq",
    "datasets_app",
    "runs",
    "training",
    "evaluation",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",  # collected static files, straight from gunicorn
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
]

ROOT_URLCONF = "mlops_site.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "mlops_site.wsgi.application"
ASGI_APPLICATION = "mlops_site.asgi.application"

DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL") or f"sqlite:///{VAR_DIR / 'db.sqlite3'}",
        conn_max_age=envint("DB_CONN_MAX_AGE", 0),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # The embedded default writes from several threads at once: a run's steps in the
    # server process (progress, heartbeat, logs, checkpoints) while pages and the admin
    # save. WAL lets readers and one writer proceed together; IMMEDIATE transactions take
    # the write lock when they begin, so a save never deadlocks upgrading a read lock
    # (SQLite answers that with "database is locked" at once, whatever the timeout);
    # `timeout` (the busy timeout, seconds) makes a writer wait for the lock instead.
    DATABASES["default"].setdefault("OPTIONS", {}).update({
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL",
    })

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATICFILES_FINDERS = [
    "django.contrib.staticfiles.finders.FileSystemFinder",
    "django.contrib.staticfiles.finders.AppDirectoriesFinder",
]
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT", BASE_DIR / "staticfiles"))
# Hashed, compressed file names (cached forever by browsers) need `collectstatic` to
# have run: the web container and scripts/served_mode.sh run it on start. Elsewhere
# (tests, runserver) the plain storage needs no collected manifest.
STATIC_MANIFEST = envbool("STATIC_MANIFEST", PRODUCTION)
if not STATIC_MANIFEST:
    # WhiteNoise warns at start-up when nothing was collected yet, as in tests and runserver.
    warnings.filterwarnings("ignore", message=rf"No directory at: {re.escape(str(STATIC_ROOT))}")
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"
        if STATIC_MANIFEST
        else "django.contrib.staticfiles.storage.StaticFilesStorage"
    },
}
# Where WhiteNoise finds static files. Without hashed names (the embedded default:
# `make serve`, runserver with DEBUG on or off) it reads them from their source
# folders (static/, the apps', the vendored plotly.js) at each request, so nothing
# needs collecting and an edited stylesheet shows on reload. gunicorn
# (mlops_site/gunicorn_conf.py sets STATIC_FROM_SOURCE=false) and production serve
# only what `collectstatic` gathered into STATIC_ROOT.
STATIC_FROM_SOURCE = envbool("STATIC_FROM_SOURCE", not STATIC_MANIFEST)
if STATIC_FROM_SOURCE and STATIC_MANIFEST:
    raise ImproperlyConfigured("STATIC_FROM_SOURCE needs STATIC_MANIFEST=false: hashed names exist only in collected files")
WHITENOISE_USE_FINDERS = STATIC_FROM_SOURCE
WHITENOISE_AUTOREFRESH = STATIC_FROM_SOURCE
if not STATIC_MANIFEST:
    # Without hashed names, the vendored files named by their version (static/vendor/,
    # mlops_site/staticfiles.py) are still safe to cache for good; the rest get a minute.
    from .staticfiles import VERSIONED_VENDOR_URL

    WHITENOISE_IMMUTABLE_FILE_TEST = VERSIONED_VENDOR_URL

LOGIN_URL = "/accounts/login/"
# Password logins (login page, admin) lock after LOGIN_FAILURE_LIMIT failures per
# username or client address, for LOGIN_LOCKOUT_SECONDS (mlops_site/auth.py).
AUTHENTICATION_BACKENDS = ["mlops_site.auth.ThrottledModelBackend"]
LOGIN_FAILURE_LIMIT = envint("LOGIN_FAILURE_LIMIT", 5)
LOGIN_LOCKOUT_SECONDS = envint("LOGIN_LOCKOUT_SECONDS", 900)
# Shared between processes through Redis in served mode (the lockout must hold
# across gunicorn workers); per process otherwise.
CACHES = {
    "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": os.environ["REDIS_URL"]}
    if os.environ.get("REDIS_URL")
    else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
}
LOGIN_REDIRECT_URL = "/"

# --- Data: uploaded and seeded datasets live here under generated names.
DATA_DIR = Path(os.environ.get("MLOPS_DATA_DIR", VAR_DIR / "data"))
BUNDLED_DATA_DIR = BASE_DIR / "data"
DATASET_MAX_BYTES = envint("DATASET_MAX_BYTES", 50 * 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = envint("DATA_UPLOAD_MAX_MEMORY_SIZE", 2 * 1024 * 1024)
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024

# --- Models: local:<name> models are built here; hub downloads are cached by HF_HOME.
MODELS_DIR = Path(os.environ.get("MLOPS_MODELS_DIR", VAR_DIR / "models"))
# A plain path as model.base (/models/my-llama) reads the workers' file system: only
# under these folders (colon-separated, like PATH), checked at validation and again on
# the worker (runs.config.check_model_reference). Empty: local:<name> builds and hub ids only.
MLOPS_MODEL_PATHS = [p.strip() for p in os.environ.get("MLOPS_MODEL_PATHS", "").split(":") if p.strip()]
# The cpu workers call evaluation.judge.base_url: an operator may restrict judges to
# these URL prefixes (comma-separated, e.g. http://vllm:8000/v1). Empty: any http(s) URL.
MLOPS_JUDGE_URL_PREFIXES = envlist("MLOPS_JUDGE_URL_PREFIXES", [])

# --- Jobs: with REDIS_URL set, jobs go to RQ queues; without it they run inline.
REDIS_URL = os.environ.get("REDIS_URL", "")
JOBS_INLINE = not REDIS_URL
RQ_QUEUES = {
    name: {"URL": REDIS_URL or "redis://127.0.0.1:6379/0", "DEFAULT_TIMEOUT": envint("RQ_JOB_TIMEOUT", 6 * 3600)}
    for name in ("gpu", "cpu", "default")
}
RQ_SHOW_ADMIN_LINK = True
# `manage.py rqworker gpu|cpu` imports the ML stack once per worker, not once per job (runs/worker.py).
RQ = {"WORKER_CLASS": os.environ.get("RQ_WORKER_CLASS", "runs.worker.PreloadingWorker")}
HEARTBEAT_SECONDS = envint("HEARTBEAT_SECONDS", 10)
REAPER_STALE_SECONDS = envint("REAPER_STALE_SECONDS", 120)

# --- MLflow: a local store under var/ unless a tracking server is named.
MLFLOW_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{VAR_DIR / 'mlflow.db'}"
# Where a local (sqlite) store keeps artifacts; a tracking server decides for itself.
MLFLOW_ARTIFACT_ROOT = os.environ.get("MLFLOW_ARTIFACT_ROOT") or (VAR_DIR / "mlartifacts").as_uri()
MLFLOW_EXPERIMENT = os.environ.get("MLFLOW_EXPERIMENT", "rag-finetune")
MLFLOW_UI_URL = os.environ.get("MLFLOW_UI_URL", "")

# --- API
REST_FRAMEWORK = {
    # Token first: DRF answers an unauthenticated request 401 with a WWW-Authenticate
    # header only when the first class names a scheme (session auth names none: 403).
    # Session auth still serves the browsable API and the docs, and still enforces CSRF
    # on session writes.
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # JSON bodies pass the size/depth bound (mlops_site/limits.py) before json.load.
    "DEFAULT_PARSER_CLASSES": [
        "runs.api_errors.BoundedJSONParser",
        "rest_framework.parsers.FormParser",
        "rest_framework.parsers.MultiPartParser",
    ],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.PageNumberPagination",
    "PAGE_SIZE": envint("API_PAGE_SIZE", 50),
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "runs.api_errors.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "RAG fine-tuning platform API",
    "DESCRIPTION": "Datasets, pipeline runs (LoRA fine-tuning + RAGAS scoring) and their results.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    "COMPONENT_SPLIT_REQUEST": True,
    # Swagger UI is served from the app (no CDN): see the offline rule in docs/ARCHITECTURE.md.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    # Every operation documents its error answers (400/401/403/404, 409 where a
    # transition can be refused) with the one error shape the API returns.
    "POSTPROCESSING_HOOKS": ["drf_spectacular.hooks.postprocess_schema_enums", "runs.api_errors.document_error_responses"],
}

# --- Security: safe by default, stricter in production (MLOPS_PRODUCTION=true).
SESSION_COOKIE_HTTPONLY = True
CSRF_COOKIE_HTTPONLY = False  # htmx reads the token from the cookie-less form field
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SESSION_COOKIE_SECURE = envbool("SESSION_COOKIE_SECURE", PRODUCTION)
CSRF_COOKIE_SECURE = envbool("CSRF_COOKIE_SECURE", PRODUCTION)
SECURE_SSL_REDIRECT = envbool("SECURE_SSL_REDIRECT", PRODUCTION)
SECURE_HSTS_SECONDS = envint("SECURE_HSTS_SECONDS", 31536000 if PRODUCTION else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = envbool("SECURE_HSTS_INCLUDE_SUBDOMAINS", PRODUCTION)
SECURE_HSTS_PRELOAD = envbool("SECURE_HSTS_PRELOAD", PRODUCTION)
# Container health probes speak plain HTTP inside the private network.
SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
if envbool("SECURE_PROXY_SSL_HEADER", False):
    # Only behind a proxy that sets X-Forwarded-Proto itself (and strips a client's).
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

# Logs go to stdout (12-factor): LOG_FORMAT=json gives one JSON object per line for a
# log collector, `plain` (the default) is for people.
LOG_FORMAT = os.environ.get("LOG_FORMAT", "plain")
if LOG_FORMAT not in {"plain", "json"}:
    raise ImproperlyConfigured(f"LOG_FORMAT must be plain or json, got {LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "mlops_site.log_format.JsonFormatter"},
    },
    "handlers": {"stdout": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout", "formatter": LOG_FORMAT}},
    "root": {"handlers": ["stdout"], "level": os.environ.get("LOG_LEVEL", "INFO")},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        "absl": {"level": "WARNING"},  # rouge-score's "Using default tokenizer." per sample
        "httpx": {"level": "WARNING"},
        "alembic": {"level": "WARNING"},
        "mlflow": {"level": "WARNING"},
    },
}

# Offline rule: nothing may phone home (docs/ARCHITECTURE.md, "The offline rule").
os.environ.setdefault("RAGAS_DO_NOT_TRACK", "true")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
