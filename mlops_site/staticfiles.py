"""Front-end libraries, served by the app itself (no CDN: the offline rule).

htmx comes with django-htmx (its own static files). plotly.js is vendored under
static/vendor/: the npm package plotly.js-basic-dist-min, which holds the trace
types static/js/app.js draws (scatter for the loss curves, bar for the scores;
pie too) with the cartesian axes, subplots, shapes and annotations the charts
use. It is 1.2 MB, against the 4.8 MB full bundle the plotly Python package
ships, and it sits next to a gzip copy (`gzip -9n`, 0.39 MB) that WhiteNoise
sends to browsers that accept gzip: from the source folder in the embedded
default, from STATIC_ROOT once collected. Its name carries its version, so
browsers may cache it for good (settings.WHITENOISE_IMMUTABLE_FILE_TEST).

To update it: `npm pack plotly.js-basic-dist-min@<version>`, copy
plotly-basic.min.js and LICENSE in under the new version's names, write the
.gz again, change the constants below and templates/_plotly_script.html
(tests/test_static_vendor.py checks they agree).
"""

from __future__ import annotations

PLOTLY_PACKAGE = "plotly.js-basic-dist-min"
PLOTLY_VERSION = "4.1.1"
PLOTLY_FILE = f"vendor/plotly-basic-{PLOTLY_VERSION}.min.js"
PLOTLY_LICENSE = f"vendor/plotly-basic-{PLOTLY_VERSION}.LICENSE.txt"
# The npm tarball's integrity (npm view plotly.js-basic-dist-min@4.1.1 dist.integrity) and the file's own sha256.
PLOTLY_NPM_INTEGRITY = "sha512-1oNF8PeQx2hv/y7tqEVWKD3JGwn/MGEMQ8mL9HUwsaqG9FGy/OU5FHUHvzqbqxN4mnwZGI9abTiE775C4kkjMQ=="
PLOTLY_SHA256 = "99784e3abfb07b142a15e521a439e6d9addceadb3f79553fd24c72774f0649ba"
# Vendored files whose names carry a version (plotly-basic-4.1.1.min.js): never change, cache forever.
VERSIONED_VENDOR_URL = r"^/static/vendor/[\w.-]+-\d+\.\d+\.\d+\.min\.js$"
