"""GET /healthz: can this deployment take runs right now?

Checks the database, Redis, and that at least one live RQ worker listens on each
pipeline queue (gpu, cpu). 200 when all are there, 503 with `missing` naming what
is not: container health checks, load balancers and scripts/served_mode.sh wait
on it. Open to anonymous callers, so it reports names and counts, never URLs,
hosts or error messages (they can carry credentials).

A worker counts as live while its key exists in Redis: RQ refreshes it with every
heartbeat and removes it on a clean shutdown; a SIGKILLed worker drops out when
the key's TTL runs out (RQ's worker_ttl, 420 s by default).
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

log = logging.getLogger(__name__)

PIPELINE_QUEUES = ("gpu", "cpu")
REDIS_TIMEOUT_SECONDS = 2.0


def database_ok() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception:
        log.warning("healthz: database check failed", exc_info=True)
        return False
    return True


def live_workers(queue_names: tuple[str, ...]) -> dict[str, int] | None:
    """Live workers per queue, or None when Redis cannot be reached."""
    import redis
    from rq import Queue, Worker

    counts: dict[str, int] = {}
    connections: dict[str, redis.Redis] = {}
    try:
        for name in queue_names:
            url = settings.RQ_QUEUES[name]["URL"]
            if url not in connections:
                connections[url] = redis.Redis.from_url(
                    url, socket_connect_timeout=REDIS_TIMEOUT_SECONDS, socket_timeout=REDIS_TIMEOUT_SECONDS
                )
                connections[url].ping()
            counts[name] = len(Worker.all(queue=Queue(name, connection=connections[url])))
    except redis.RedisError:
        log.warning("healthz: Redis check failed", exc_info=True)
        return None
    finally:
        for conn in connections.values():
            conn.close()
    return counts


@never_cache
@require_safe
def healthz(request: HttpRequest) -> JsonResponse:
    missing: list[str] = []
    checks: dict[str, object] = {"database": "ok" if database_ok() else "unreachable"}
    if checks["database"] != "ok":
        missing.append("database")

    if settings.JOBS_INLINE:
        # Embedded default: jobs run inside the web process; there is nothing else to need.
        checks["redis"] = "not used (jobs run inline)"
        checks["workers"] = {}
    else:
        counts = live_workers(PIPELINE_QUEUES)
        if counts is None:
            checks["redis"] = "unreachable"
            checks["workers"] = {name: None for name in PIPELINE_QUEUES}
            missing.append("redis")
        else:
            checks["redis"] = "ok"
            checks["workers"] = counts
        missing += [f"worker:{name}" for name in PIPELINE_QUEUES if not (counts or {}).get(name)]

    body = {"status": "unavailable" if missing else "ok", "missing": missing, **checks}
    return JsonResponse(body, status=503 if missing else 200)
