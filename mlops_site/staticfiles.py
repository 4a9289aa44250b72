"""Front-end libraries served from installed packages: no CDN, no vendored copy in git.

htmx comes with django-htmx (its own static files); plotly.js with the plotly
package, exposed here as static/vendor/plotly.min.js.
"""

from __future__ import annotations

from pathlib import Path

from django.contrib.staticfiles.finders import BaseFinder
from django.core.files.storage import FileSystemStorage

PREFIX = "vendor"


def _plotly_dir() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data"


class VendorFinder(BaseFinder):
    files = ("plotly.min.js",)

    def _storage(self) -> FileSystemStorage:
        storage = FileSystemStorage(location=str(_plotly_dir()))
        storage.prefix = PREFIX
        return storage

    def check(self, **kwargs):
        return []

    def find(self, path: str, find_all: bool = False, **kwargs):
        name = path.removeprefix(f"{PREFIX}/")
        if path.startswith(f"{PREFIX}/") and name in self.files:
            match = str(_plotly_dir() / name)
            return [match] if find_all or kwargs.get("all") else match
        # Not found is [] whatever find_all says, as with Django's own finders:
        # staticfiles.finders.find() would take None for a match.
        return []

    def list(self, ignore_patterns):
        storage = self._storage()
        for name in self.files:
            yield name, storage
