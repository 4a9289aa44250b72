"""The vendored plotly.js: the pinned file, its licence, its gzip copy, one script tag, served compressed and cached."""

import gzip
import hashlib
import re

from django.conf import settings

from mlops_site import staticfiles

VENDOR = settings.BASE_DIR / "static"


def test_the_vendored_bundle_is_the_pinned_file_with_its_licence_and_an_identical_gzip_copy():
    bundle = (VENDOR / staticfiles.PLOTLY_FILE).read_bytes()
    assert hashlib.sha256(bundle).hexdigest() == staticfiles.PLOTLY_SHA256
    assert f"plotly.js (basic - minified) v{staticfiles.PLOTLY_VERSION}" in bundle[:200].decode()
    assert gzip.decompress((VENDOR / f"{staticfiles.PLOTLY_FILE}.gz").read_bytes()) == bundle
    assert "MIT License" in (VENDOR / staticfiles.PLOTLY_LICENSE).read_text()


def test_the_bundle_holds_every_trace_type_the_charts_draw():
    # `type:` also names axis, shape and error-bar types; those are not traces.
    not_traces = {"line", "category", "log", "linear", "date", "data", "percent", "constant", "sqrt"}
    drawn = set()
    for script in sorted((VENDOR / "js").glob("*.js")):
        drawn |= set(re.findall(r'type: "(\w+)"', script.read_text())) - not_traces
    drawn.add("scatter")  # a trace without a type is a scatter (the loss curves)
    bundle = (VENDOR / staticfiles.PLOTLY_FILE).read_text()
    for trace in drawn:
        assert f'moduleType:"trace",name:"{trace}"' in bundle, trace


def test_the_pages_name_the_vendored_file_once():
    tag = (settings.BASE_DIR / "templates" / "_plotly_script.html").read_text()
    assert f'static "{staticfiles.PLOTLY_FILE}"' in tag and tag.count("<script") == 1
    for page in ("run_detail.html", "run_results.html", "compare.html"):
        template = (settings.BASE_DIR / "templates" / "runs" / page).read_text()
        assert template.count('{% include "_plotly_script.html" %}') == 1 and "plotly" not in template.replace("_plotly_script", ""), page


def test_it_is_served_gzipped_and_cached_for_good_from_source(client):
    url = f"/static/{staticfiles.PLOTLY_FILE}"
    compressed = client.get(url, HTTP_ACCEPT_ENCODING="gzip, deflate, br")
    body = b"".join(compressed.streaming_content)
    assert compressed.status_code == 200 and compressed["Content-Encoding"] == "gzip" and compressed["Content-Type"].startswith("text/javascript")
    assert len(body) == int(compressed["Content-Length"]) < 450_000
    assert "immutable" in compressed["Cache-Control"] and "Accept-Encoding" in compressed["Vary"]
    plain = client.get(url)
    assert "Content-Encoding" not in plain and int(plain["Content-Length"]) == (VENDOR / staticfiles.PLOTLY_FILE).stat().st_size
    # The app's own files change with the code: a short cache only.
    assert "immutable" not in client.get("/static/js/app.js")["Cache-Control"]
