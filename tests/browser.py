"""Headless Chromium for the page tests: Debian's chromium (`.ci/run` installs it) driven by
Playwright with `executable_path` (Playwright's own browser download is not reachable here).
`browser_page()` skips the test, with the reason, where either is missing."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

# a closed network: no background connections, no first-run work (each would be refused, slowly)
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
# where screenshots go: kept after the run for a person to look at (the CI log names them)
ARTIFACTS = Path(os.environ.get("HOOKDELTA_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / ".artifacts"))


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@contextlib.contextmanager
def browser_page(width: int = 1400, height: int = 900) -> Iterator[tuple[object, list[str]]]:
    """A Playwright page in headless Chromium, and the list its console errors and page errors go to."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")
    exe = chromium()
    if exe is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            yield page, errors
        finally:
            browser.close()


def screenshot(page: object, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=False)  # type: ignore[attr-defined]
    print(f"screenshot: {path}")
    return path
