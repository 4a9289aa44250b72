"""What the charted pages cost a browser: the bytes their scripts transfer and how soon they are interactive.

A real headless Chromium against `make serve` (the embedded default: WhiteNoise serving
static files from their source folders). Every load starts with an empty cache, as a
new user's first visit does. The pages load one plotly.js, the vendored partial bundle
(static/vendor/), gzip-compressed on the wire; the run page's polling never loads it again.

The bytes are asserted always. The time to interactive (deferred scripts run and the
chart drawn) is measured on every run and written to test-artifacts/page-weight.json;
it is asserted only on an idle machine (under 20% CPU busy just before the loads and again
just after them: CI runs two test shares at once), as a timing taken while other work shares
the CPU measures that work, not the page. The results page, the one issue 26 set the target
for, within 1 s; the run and compare pages, which draw their charts after more of the page,
within 1.5 s (measured 904 and 1,080 ms on an idle CI machine on 2026-12-06).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.browser.test_pages_in_chromium import CHROMIUM, SHOTS, log_in, servable_password, training_run
from tests.conftest import ROOT

pytestmark = [
    pytest.mark.pipeline,
    pytest.mark.django_db(transaction=True),
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed (apt-get install chromium); .ci/run installs it"),
]

SCRIPT_BUDGET_BYTES = 800_000
INTERACTIVE_BUDGET_MS = {"results": 1000, "run": 1500, "compare": 1500}
COLD_LOADS = 5
PLOTLY_PREFIX = "/static/vendor/plotly"


def machine_is_idle(seconds: float = 2.0) -> bool:
    """Under 20% of the CPUs busy over a short sample (taken before the test loads any page):
    the load average would count the test's own server and browser for a minute after."""
    def busy_and_total() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields) - idle, sum(fields)

    if not Path("/proc/stat").exists():
        return os.getloadavg()[0] < (os.cpu_count() or 1) / 2
    busy_before, total_before = busy_and_total()
    time.sleep(seconds)
    busy_after, total_after = busy_and_total()
    return (busy_after - busy_before) / max(1, total_after - total_before) < 0.2


class Transfers:
    """Every response of a page with its transferred (encoded) body size."""

    def __init__(self, page) -> None:
        self.responses: list = []
        page.on("requestfinished", lambda request: self.responses.append(request))

    def scripts(self) -> list[tuple[str, int, str]]:
        out = []
        for request in self.responses:
            if request.resource_type != "script":
                continue
            response = request.response()
            encoding = (response.headers.get("content-encoding") or "identity") if response else "?"
            out.append((urlparse(request.url).path, request.sizes()["responseBodySize"], encoding))
        return out

    def plotly_loads(self) -> int:
        return sum(1 for request in self.responses if urlparse(request.url).path.startswith(PLOTLY_PREFIX))


def cold_load(browser, app_url, state, path: str, ready: str) -> dict:
    """One visit with an empty cache: script bytes on the wire and milestones (ms from navigation start)."""
    context = browser.new_context(viewport={"width": 1366, "height": 900}, base_url=app_url, storage_state=state)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    transfers = Transfers(page)
    page.goto(path, wait_until="load")
    page.wait_for_selector(ready)
    drawn = page.evaluate("performance.now()")
    timing = page.evaluate("""() => { const n = performance.getEntriesByType('navigation')[0];
        return {dom_interactive: n.domInteractive, dom_content_loaded: n.domContentLoadedEventEnd, load: n.loadEventEnd}; }""")
    scripts = transfers.scripts()
    context.close()
    assert not errors, errors
    return {**{k: round(v) for k, v in timing.items()}, "chart_drawn": round(drawn), "scripts": scripts,
            "script_bytes": sum(size for _, size, _ in scripts), "plotly_loads": transfers.plotly_loads()}


@pytest.fixture
def logged_in_state(browser, app_url, user) -> dict:
    servable_password(user, "correct-horse-battery-staple")
    context = browser.new_context(base_url=app_url)
    page = context.new_page()
    log_in(page)
    state = context.storage_state()
    context.close()
    return state


def test_charted_pages_load_one_compressed_partial_plotly_and_are_interactive_fast(browser, app_url, logged_in_state, user):
    from tests.runs.test_views import scored_run

    idle = machine_is_idle()
    finetune, eval_only = scored_run(user), scored_run(user, kind="eval_only")
    pages = {
        "results": (f"/runs/{finetune.pk}/results/", ".results-chart .main-svg"),
        "run": (f"/runs/{training_run(user).pk}/", "#loss-chart .main-svg"),
        "compare": (f"/compare/?runs={finetune.pk},{eval_only.pk}", "#compare-chart .main-svg"),
    }
    cold_load(browser, app_url, logged_in_state, *pages["results"])  # the server's first requests (imports, templates) are not the page's cost
    figures: dict[str, dict] = {}
    for name, (path, ready) in pages.items():
        loads = [cold_load(browser, app_url, logged_in_state, path, ready) for _ in range(COLD_LOADS)]
        figures[name] = {
            "path": path, "scripts": loads[0]["scripts"], "script_bytes": max(load["script_bytes"] for load in loads),
            **{f"median_{k}_ms": statistics.median(load[k] for load in loads) for k in ("dom_content_loaded", "chart_drawn", "load")},
            "plotly_loads": max(load["plotly_loads"] for load in loads),
        }
    idle_after = machine_is_idle()
    figures["machine"] = {"load_average": os.getloadavg(), "cpus": os.cpu_count(), "idle_before_the_loads": idle,
                          "idle_after_the_loads": idle_after}
    out = ROOT / "test-artifacts" / "page-weight.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))

    for name in pages:
        page = figures[name]
        assert page["plotly_loads"] == 1, (name, page["scripts"])
        plotly = [s for s in page["scripts"] if s[0].startswith(PLOTLY_PREFIX)]
        assert plotly and plotly[0][2] == "gzip", (name, plotly)  # compressed on the wire
        assert page["script_bytes"] < SCRIPT_BUDGET_BYTES, (name, page["scripts"])
        if idle and idle_after:
            assert page["median_chart_drawn_ms"] < INTERACTIVE_BUDGET_MS[name], (name, page)


def test_the_run_page_loads_plotly_once_while_it_polls(browser, app_url, logged_in_state, user):
    context = browser.new_context(viewport={"width": 1366, "height": 900}, base_url=app_url, storage_state=logged_in_state)
    page = context.new_page()
    transfers = Transfers(page)
    run = training_run(user)
    page.goto(f"/runs/{run.pk}/")
    page.wait_for_selector("#loss-chart .main-svg")
    # The status fragment polls every 2 s: three polls later the page still has the one plotly.js it loaded.
    with page.expect_response(lambda r: f"/runs/{run.pk}/status/" in r.url, timeout=15_000):
        pass
    page.wait_for_timeout(4500)
    polls = sum(1 for request in transfers.responses if f"/runs/{run.pk}/status/" in request.url)
    assert polls >= 2 and transfers.plotly_loads() == 1, (polls, transfers.plotly_loads())
    assert page.evaluate("document.querySelectorAll('script[src*=\"plotly\"]').length") == 1
    page.screenshot(path=str(SHOTS / "30-run-page-polling.png"), full_page=True)
    # The partial bundle has what the controls need: a log axis, redrawn in place.
    page.check("#loss-log-scale")
    page.wait_for_function("document.getElementById('loss-chart').layout.yaxis.type === 'log'")
    page.screenshot(path=str(SHOTS / "31-run-page-log-scale.png"), full_page=True)
    assert transfers.plotly_loads() == 1
    context.close()
