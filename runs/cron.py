"""RQ's cron scheduler config: `python manage.py rqcron runs.cron`.

Queues the reaper on the cpu queue every REAPER_INTERVAL_SECONDS, so a worker
killed with SIGKILL (which never reports its failure) does not leave its run
`training` or `evaluating` forever.
"""

import os

from rq import cron

from runs.jobs import reap_job

cron.register(reap_job, queue_name="cpu", interval=int(os.environ.get("REAPER_INTERVAL_SECONDS", "30")), job_timeout=300, name="reap-stale-runs")
