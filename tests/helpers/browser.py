"""Headless Chromium for the browser tests: Debian's /usr/bin/chromium driven by Playwright (never a download)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

# as root, on a closed network: no sandbox, no GPU, and none of Chromium's own background connections
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

ARTIFACTS = Path(os.environ.get("OPENPACS_TEST_ARTIFACTS") or Path(__file__).resolve().parents[2] / "test-artifacts")


def missing(what: str) -> None:
    """Skip for a missing tool, or fail when the suite must run everything (OPENPACS_TEST_REQUIRE_ALL, as CI does)."""
    if os.environ.get("OPENPACS_TEST_REQUIRE_ALL", "") not in ("", "0", "false"):
        pytest.fail(f"{what} (OPENPACS_TEST_REQUIRE_ALL is set)", pytrace=False)
    pytest.skip(what)


def chromium() -> str:
    path = os.environ.get("OPENPACS_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        missing(f"Chromium not found at {path}")
    return path


def ohif_dir() -> Path:
    """The OHIF build, installed once per machine (a marker check when already there), and exported as
    OPENPACS_OHIF_DIR for the servers the test starts; skips (or fails in CI) when it cannot be installed."""
    from openpacs.web.viewer import OhifInstallError, default_ohif_dir, install_ohif

    dest = Path(os.environ.get("OPENPACS_OHIF_DIR") or default_ohif_dir())
    try:
        installed = install_ohif(dest)
    except (OhifInstallError, OSError) as exc:
        missing(f"cannot install the OHIF viewer into {dest}: {exc}")
        raise
    os.environ.setdefault("OPENPACS_OHIF_DIR", str(installed))
    return installed


# OHIF opens a first-visit tour (Shepherd, with a modal overlay) on /viewer once its JavaScript is ready; the overlay takes
# every click and wheel event until it is closed, and it appears at a moment that races the test's own actions (a CI run
# lost a click on the cine player's play button to it). The tests act as a user who has seen it: the tour's id marked as
# shown in localStorage, which is what OHIF itself does when the tour is closed (ui-next Onboarding/utilities.ts).
OHIF_TOURS_SEEN = "try { localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])); } catch (e) {}"


def ohif_page(browser, **context_options):
    """A new page (in a context of its own, with ``context_options``) for which OHIF's first-visit tour was seen."""
    context = browser.new_context(**context_options)
    context.add_init_script(OHIF_TOURS_SEEN)
    return context.new_page()


@contextmanager
def ohif_browser(chromium_path: str | None = None, **context_options: Any) -> Iterator[Any]:
    """Debian's Chromium (headless, CHROMIUM_ARGS) and one :func:`ohif_page`; the browser is closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path or chromium(), args=CHROMIUM_ARGS)
        try:
            yield ohif_page(browser, **context_options)
        finally:
            browser.close()
