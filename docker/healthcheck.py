#!/usr/bin/env python3
"""Container health checks of docker-compose.yml: exit 0 when healthy, 1 when not.

    healthcheck.py http URL          URL answers 200; the Host header is the first
                                     ALLOWED_HOSTS entry when that is set (Django
                                     refuses other hosts)
    healthcheck.py rq-worker QUEUE   an RQ worker of this container (same hostname)
                                     is registered on QUEUE in REDIS_URL
    healthcheck.py rq-cron           RQ's cron scheduler of this container is registered

Standard library only for `http` (the MLflow image has no redis client).
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit


def http_ok(url: str) -> bool:
    headers = {}
    allowed = [h.strip() for h in os.environ.get("ALLOWED_HOSTS", "").split(",") if h.strip() and h.strip() != "*"]
    if allowed:
        port = urlsplit(url).port
        host = allowed[0].lstrip(".")
        headers["Host"] = f"{host}:{port}" if port else host
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as response:  # noqa: S310 - fixed URL from compose
            return response.status == 200
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {exc}", file=sys.stderr)
        return False


def _redis():
    import redis

    return redis.Redis.from_url(os.environ["REDIS_URL"], socket_connect_timeout=3, socket_timeout=3)


def rq_worker_ok(queue_name: str) -> bool:
    from rq import Queue, Worker

    hostname = socket.gethostname()
    workers = Worker.all(queue=Queue(queue_name, connection=_redis()))
    return any(worker.hostname == hostname for worker in workers)


def rq_cron_ok() -> bool:
    from rq.cron import CronScheduler

    hostname = socket.gethostname()
    return any(scheduler.hostname == hostname for scheduler in CronScheduler.all(_redis()))


def main(argv: list[str]) -> int:
    match argv:
        case ["http", url]:
            ok = http_ok(url)
        case ["rq-worker", queue_name]:
            ok = rq_worker_ok(queue_name)
        case ["rq-cron"]:
            ok = rq_cron_ok()
        case _:
            print(__doc__, file=sys.stderr)
            return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
