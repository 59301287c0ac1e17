"""The browser fixtures and hooks (tests/support/fp_browser.py) for the web tests.

Every test that uses the browser gets the ``browser`` marker, so
``-m 'not browser'`` leaves them out, and a test that fails leaves a
screenshot of its page (``NN-failure.png`` in its tmp_path) to look at.
"""

from __future__ import annotations

from fp_browser import (
    chromium,
    page,
    pytest_collection_modifyitems,
    pytest_runtest_makereport,
)

__all__ = ["chromium", "page", "pytest_collection_modifyitems", "pytest_runtest_makereport"]
