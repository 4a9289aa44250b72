"""SQL queries per request stay flat as the history grows.

A list or detail whose query count follows the number of runs or results (an
N+1) is what makes the web side slow with a long history; bench/bench_web.py
measures the latency with 10,000 runs, this guards the count. Every endpoint
here is requested twice: with a short history, then with more runs than a
page holds and more results (several datasets, both variants) per run.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from datasets_app.models import Dataset
from runs.models import PipelineRun, RunResult

from .factories import make_run

pytestmark = pytest.mark.django_db

METRICS = ["semantic_similarity", "rouge_score", "bleu_score", "non_llm_context_precision"]

# name -> (client fixture, URL of a run). Pages (session clients) can join this table.
ENDPOINTS: dict[str, tuple[str, Callable[[PipelineRun], str]]] = {
    "api-list": ("api", lambda run: "/api/runs/"),
    "api-list-filtered": ("api", lambda run: "/api/runs/?status=completed,failed"),
    "api-list-staff": ("staff_api", lambda run: "/api/runs/"),
    "api-detail": ("api", lambda run: f"/api/runs/{run.pk}/"),
    "api-detail-staff": ("staff_api", lambda run: f"/api/runs/{run.pk}/"),
}


def add_history(owner, *, runs: int, datasets: list[str], metrics: int) -> PipelineRun:
    """`runs` completed runs with results for every (dataset, variant, metric); returns the newest."""
    created = [make_run(owner, status="completed") for _ in range(runs)]
    dataset_rows = list(Dataset.objects.filter(name__in=datasets))
    RunResult.objects.bulk_create([
        RunResult(run=run, dataset=dataset, variant=variant, metric=metric, value=0.5, n_scored=3)
        for run in created for dataset in dataset_rows for variant in ("base", "finetuned") for metric in METRICS[:metrics]
    ])
    for run in created:
        run.train_datasets.set(Dataset.objects.filter(name="rag_qa_train"))
        run.eval_datasets.set(dataset_rows)
    return created[-1]


def count_queries(client, url: str) -> int:
    client.get(url)  # the first request fills per-process caches (content types, ...)
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    assert response.status_code == 200, response.content[:500]
    return len(queries)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_queries_per_request_do_not_grow_with_runs_or_results(endpoint, request, user):
    fixture, url_of = ENDPOINTS[endpoint]
    client = request.getfixturevalue(fixture)
    short = add_history(user, runs=2, datasets=["ragas_eval"], metrics=1)
    with_short_history = count_queries(client, url_of(short))

    long = add_history(user, runs=60, datasets=["ragas_eval", "medical_ragas_eval", "legal_ragas_eval"], metrics=4)
    assert PipelineRun.objects.count() > 50  # more than one API page
    assert long.results.count() == 24
    with_long_history = count_queries(client, url_of(long))

    assert with_long_history == with_short_history, f"{endpoint}: {with_short_history} queries, then {with_long_history}"
    # auth + count + page, or auth + run + results + comparisons + promotion decisions
    assert with_long_history <= (6 if endpoint.startswith("api-detail") else 4)


def test_the_list_does_not_read_the_large_columns(api, user):
    """A page of the list never loads logs, configs or loss curves it does not show."""
    make_run(user, status="completed", logs="x" * 100_000, train_history=[{"step": s, "loss": 1.0} for s in range(5000)])
    with CaptureQueriesContext(connection) as queries:
        response = api.get("/api/runs/")
    assert response.status_code == 200 and response.json()["count"] == 1
    page_query = next(q["sql"] for q in queries if 'FROM "runs_pipelinerun"' in q["sql"] and "COUNT(" not in q["sql"])
    for column in ("logs", "train_history", "config", "reproducibility"):
        assert f'"runs_pipelinerun"."{column}"' not in page_query
