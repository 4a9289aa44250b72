"""gunicorn settings for the web process: `gunicorn -c python:mlops_site.gunicorn_conf mlops_site.wsgi`.

Used by the web container (docker-compose.yml) and scripts/served_mode.sh.
Environment: WEB_BIND (default 0.0.0.0:8000), WEB_CONCURRENCY (worker
processes, default 2), WEB_THREADS (default 4), WEB_TIMEOUT (seconds, default
60); logs (access and errors) go to stdout in the LOG_FORMAT of the Django
processes. Jobs never run here: they go to the RQ workers.
"""

import os

# gunicorn serves what `collectstatic` gathered (the web container and served_mode.sh
# run it first), never the source folders that runserver reads (settings.py).
os.environ.setdefault("STATIC_FROM_SOURCE", "false")

bind = os.environ.get("WEB_BIND", "0.0.0.0:8000")  # noqa: S104 - the container's port; served_mode.sh binds 127.0.0.1
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("WEB_THREADS", "4"))
timeout = int(os.environ.get("WEB_TIMEOUT", "60"))
graceful_timeout = 30
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "INFO").lower()
# gunicorn's control socket lives in $HOME by default, shared by every gunicorn of the
# user (a second instance on the machine would take it over); nothing here uses it.
control_socket_disable = True
# A container's /tmp can be slow disk: heartbeat files in memory instead.
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None  # noqa: S108

if os.environ.get("LOG_FORMAT", "plain") == "json":
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "mlops_site.log_format.JsonFormatter"}},
        "handlers": {"stdout": {"class": "logging.StreamHandler", "stream": "ext://sys.stdout", "formatter": "json"}},
        "root": {"handlers": ["stdout"], "level": "INFO"},
        "loggers": {
            "gunicorn.error": {"handlers": ["stdout"], "level": loglevel.upper(), "propagate": False},
            "gunicorn.access": {"handlers": ["stdout"], "level": "INFO", "propagate": False},
        },
    }
