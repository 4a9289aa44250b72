"""The browser fixtures of test_pages_in_chromium.py (`make serve` on a free port, Debian's Chromium,
a logged-in page whose every asset is checked), for the other browser tests."""

from tests.browser.test_pages_in_chromium import app_url, browser, page, watched  # noqa: F401
