"""Headless Chromium through selenium, for the pages iclgym renders (the leaderboard's
screenshot) and the tests that browse them (the leaderboard page, the documentation site).

Debian's ``chromium`` and ``chromium-driver`` packages (``.ci/run`` installs them); the driver
is passed to selenium explicitly, so Selenium Manager never runs, and the flags keep Chromium
off the network, which these machines do not reach.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver

CHROME_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
)
"""Headless, offline Chromium flags."""


def find_chrome() -> tuple[str, str] | None:
    """(browser, chromedriver) executables on PATH (or Debian's ``/usr/bin`` ones), or
    ``None`` when either is missing."""
    names = ("chromium", "chromium-browser", "google-chrome")
    browser = next((p for n in names if (p := shutil.which(n))), None)
    if browser is None and Path("/usr/bin/chromium").exists():
        browser = "/usr/bin/chromium"
    driver = shutil.which("chromedriver")
    if driver is None and Path("/usr/bin/chromedriver").exists():
        driver = "/usr/bin/chromedriver"
    return (browser, driver) if browser and driver else None


@contextmanager
def headless_chrome(
    user_data_dir: str | Path, window: tuple[int, int] = (1400, 900)
) -> Iterator[WebDriver]:
    """A headless Chromium WebDriver (selenium, a dev dependency) with a fresh profile in
    ``user_data_dir`` and a ``window`` of CSS pixels; quit on exit. ``RuntimeError`` when
    Chromium or chromedriver is missing."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_chrome()
    if found is None:
        raise RuntimeError("chromium (or google-chrome) and chromedriver are needed")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in (*CHROME_ARGS, f"--user-data-dir={user_data_dir}",
                f"--window-size={window[0]},{window[1]}"):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    try:
        yield driver
    finally:
        driver.quit()
