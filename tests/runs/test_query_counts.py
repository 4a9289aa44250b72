"""SQL queries per request stay flat as the history grows.

A list or detail whose query count follows the number of runs or results (an
N+1) is what makes the web side slow with a long history; bench/bench_web.py
measures the latency with 10,000 and 100,000 runs, this guards the count. Every
endpoint here is requested twice: with a short history, then with more runs
than a page holds and more results (several datasets, both variants) per run.
The results page is also requested for a run with 5,000 samples.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from datasets_app.models import Dataset
from runs.models import PipelineRun, RunResult, SampleResult

from .factories import make_run

pytestmark = pytest.mark.django_db

METRICS = ["semantic_similarity", "rouge_score", "bleu_score", "non_llm_context_precision"]

# name -> (client fixture, URL of a run, the most queries it may take).
# API: auth + count + page, or auth + run + results + comparisons + promotion decisions.
# Pages: session + user, then the dashboard's count + page + datasets + results; the status
# fragment's run + events; a row's run + datasets + results; the results page's run + results +
# comparisons + the samples' datasets and variants + count and page of the sample order + the shown samples.
ENDPOINTS: dict[str, tuple[str, Callable[[PipelineRun], str], int]] = {
    "api-list": ("api", lambda run: "/api/runs/", 4),
    "api-list-filtered": ("api", lambda run: "/api/runs/?status=completed,failed", 4),
    "api-list-staff": ("staff_api", lambda run: "/api/runs/", 4),
    # + the run's jobs and its children (a sweep's trials): one query each
    "api-detail": ("api", lambda run: f"/api/runs/{run.pk}/", 8),
    "api-detail-staff": ("staff_api", lambda run: f"/api/runs/{run.pk}/", 8),
    "dashboard": ("logged_in", lambda run: "/", 6),
    "dashboard-filtered": ("logged_in", lambda run: "/?status=completed&sort=-duration", 6),
    "status-fragment": ("logged_in", lambda run: f"/runs/{run.pk}/status/", 5),  # + the run's jobs
    "run-row": ("logged_in", lambda run: f"/runs/{run.pk}/row/", 5),
    "results-page": ("logged_in", lambda run: f"/runs/{run.pk}/results/", 9),
}


@pytest.fixture
def logged_in(client, user):
    client.force_login(user)
    return client


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


def add_samples(run: PipelineRun, *, rows: int) -> None:
    """`rows` eval rows x both variants of per-sample scores, answers and contexts."""
    dataset = Dataset.objects.get(name="ragas_eval")
    SampleResult.objects.bulk_create([
        SampleResult(run=run, dataset=dataset, variant=variant, index=index, question=f"question {index}", contexts=["a context", "another"],
                     ground_truth="the truth", answer=f"{variant} says the truth {index}",
                     scores={m: (index % 7) / 7 + (0.0 if variant == "base" else 0.1 if index % 2 else -0.1) for m in METRICS}, reasons={})
        for index in range(rows) for variant in ("base", "finetuned")
    ], batch_size=2000)


def count_queries(client, url: str) -> int:
    client.get(url)  # the first request fills per-process caches (content types, ...)
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    assert response.status_code in (200, 286), response.content[:500]  # 286: a polled fragment of a finished run
    return len(queries)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_queries_per_request_do_not_grow_with_runs_or_results(endpoint, request, user):
    fixture, url_of, most = ENDPOINTS[endpoint]
    client = request.getfixturevalue(fixture)
    short = add_history(user, runs=2, datasets=["ragas_eval"], metrics=1)
    with_short_history = count_queries(client, url_of(short))

    long = add_history(user, runs=60, datasets=["ragas_eval", "medical_ragas_eval", "legal_ragas_eval"], metrics=4)
    assert PipelineRun.objects.count() > 50  # more than one API page
    assert long.results.count() == 24
    with_long_history = count_queries(client, url_of(long))

    assert with_long_history == with_short_history, f"{endpoint}: {with_short_history} queries, then {with_long_history}"
    assert with_long_history <= most


@pytest.mark.parametrize("query", ["", "?sort=wins&page=3", "?show=worse&sort=score_desc&page=2", "?metric=rouge_score&worst=25&page=2"])
def test_the_results_page_reads_as_many_queries_for_5000_samples_as_for_10(query, logged_in, user):
    short = add_history(user, runs=1, datasets=["ragas_eval"], metrics=4)
    add_samples(short, rows=5)
    long = add_history(user, runs=1, datasets=["ragas_eval"], metrics=4)
    add_samples(long, rows=2500)
    assert long.samples.count() == 5000
    with_10 = count_queries(logged_in, f"/runs/{short.pk}/results/{query}")
    with CaptureQueriesContext(connection) as queries:
        response = logged_in.get(f"/runs/{long.pk}/results/{query}")
    page = response.content.decode()
    assert response.status_code == 200 and page.count('<article class="sample"') == 10
    assert '<select name="dataset">' not in page  # one eval dataset: no choice (it was listed once per sample)
    assert len(queries) == with_10 <= ENDPOINTS["results-page"][2], f"{with_10} queries with 10 samples, then {len(queries)} with 5,000"
    # The database orders the samples on one score each; only the ten shown are read whole.
    whole = [q["sql"] for q in queries if '"runs_sampleresult"."answer"' in q["sql"]]
    assert len(whole) == 1 and '"runs_sampleresult"."index" IN' in whole[0]


def test_the_list_does_not_read_the_large_columns(api, user):
    """A page of the list never loads logs, configs or loss curves it does not show."""
    make_run(user, status="completed", logs="x" * 100_000, train_history=[{"step": s, "loss": 1.0} for s in range(5000)])
    with CaptureQueriesContext(connection) as queries:
        response = api.get("/api/runs/")
    assert response.status_code == 200 and response.json()["count"] == 1
    page_query = next(q["sql"] for q in queries if 'FROM "runs_pipelinerun"' in q["sql"] and "COUNT(" not in q["sql"])
    for column in ("logs", "train_history", "config", "reproducibility"):
        assert f'"runs_pipelinerun"."{column}"' not in page_query
