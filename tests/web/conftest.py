"""The browser fixtures (tests/support/fp_browser.py) for the web tests.

Every test that uses the browser gets the ``browser`` marker, so
``-m 'not browser'`` leaves them out, and a test that fails leaves a
screenshot of its page (``failed.png`` in its tmp_path) to look at.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest
from fp_browser import Page, chromium, page

__all__ = ["chromium", "page"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "chromium" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.browser)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    tab = getattr(item, "funcargs", {}).get("page")
    if report.when == "call" and report.failed and isinstance(tab, Page):
        tab.failure_shot()  # before the page fixture closes the tab
    return report
