"""The documentation site in a real browser: ``mkdocs build --strict`` succeeds, and in headless
Chromium (served over http, as search needs) the home page renders, an env page shows its env
table, a navigation link leads to its page, and the Material search box finds pages.

Skipped when mkdocs (the ``docs`` extra) or the Chromium / chromedriver binaries are missing.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_helpers():
    """``docs/scripts/site_screenshot.py`` (build, serve, browser) as a module."""
    spec = importlib.util.spec_from_file_location(
        "site_screenshot", ROOT / "docs" / "scripts" / "site_screenshot.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


site_tools = _load_helpers()

_MISSING_DOCS = [
    m for m in ("mkdocs", "material", "mkdocstrings") if importlib.util.find_spec(m) is None
]
pytestmark = [
    pytest.mark.skipif(
        bool(_MISSING_DOCS),
        reason=f"{', '.join(_MISSING_DOCS)} not installed: pip install -e '.[docs]'",
    ),
]
needs_browser = pytest.mark.skipif(
    site_tools.find_chrome() is None or importlib.util.find_spec("selenium") is None,
    reason="needs the chromium and chromedriver binaries (e.g. /usr/bin/chromium) and selenium",
)
WAIT_S = 20


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "site"
    built = site_tools.build_site(out)
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stdout}{built.stderr}"
    return out


def test_strict_build_writes_every_page(site):
    for page in ("index.html", "envs/ICL-MarkovChain-v0/index.html", "leaderboard/index.html"):
        assert (site / page).is_file(), page
    assert (site / "search" / "search_index.json").is_file()
    assert (site / "api" / "harness-evaluate" / "index.html").is_file()


@pytest.fixture(scope="module")
def browser(site, tmp_path_factory):
    """(driver, base URL): headless Chromium on the site served over http."""
    profile = tmp_path_factory.mktemp("chrome-profile")
    with site_tools.serve(site) as base, site_tools.headless_chrome(profile) as driver:
        driver.set_page_load_timeout(WAIT_S)
        yield driver, base


def _wait(driver, condition, message: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S).until(condition, message)


@needs_browser
def test_home_page_renders(browser):
    from selenium.webdriver.common.by import By

    driver, base = browser
    driver.get(base + "/")
    assert "iclgym" in driver.title
    header = driver.find_element(By.CSS_SELECTOR, "header.md-header")
    assert header.is_displayed() and "iclgym" in header.text
    h1 = driver.find_element(By.CSS_SELECTOR, "article h1")
    assert h1.text.startswith("iclgym")
    quickstart = driver.find_element(By.ID, "quickstart")
    assert quickstart.is_displayed()


@needs_browser
def test_env_page_shows_its_env_table(browser):
    from selenium.webdriver.common.by import By

    driver, base = browser
    driver.get(base + "/envs/ICL-MarkovChain-v0/")
    assert driver.find_element(By.CSS_SELECTOR, "article h1").text.startswith("ICL-MarkovChain-v0")
    table = driver.find_element(By.CSS_SELECTOR, "article table")
    assert table.is_displayed()
    cells = [c.text for c in table.find_elements(By.CSS_SELECTOR, "td")]
    assert "Action space" in cells and "Observation space" in cells
    assert any("Discrete(k)" in c for c in cells)


@needs_browser
def test_navigation_link_leads_to_its_page(browser):
    from selenium.webdriver.common.by import By

    driver, base = browser
    driver.get(base + "/")

    def visible_links(d):  # the sidebar lays out after the page's scripts: wait for it
        return [
            a
            for a in d.find_elements(By.CSS_SELECTOR, "nav.md-nav--primary a.md-nav__link")
            if (a.get_attribute("href") or "").rstrip("/").endswith("/oracles") and a.is_displayed()
        ]

    links = _wait(driver, visible_links, "no visible navigation link to the oracles page")
    links[0].click()
    _wait(driver, lambda d: d.current_url.rstrip("/").endswith("/oracles"), "URL did not change")
    h1 = _wait(
        driver,
        lambda d: d.find_element(By.CSS_SELECTOR, "article h1"),
        "the oracles page has no heading",
    )
    assert h1.text.startswith("Oracles")


@needs_browser
@pytest.mark.parametrize("query", ["oracle", "MarkovChain"])
def test_search_finds_pages(browser, query):
    from selenium.webdriver.common.by import By

    driver, base = browser
    driver.get(base + "/")
    driver.find_element(By.CSS_SELECTOR, "label.md-search__icon, .md-search__input").click()
    box = _wait(
        driver,
        lambda d: next(
            (
                e
                for e in d.find_elements(By.CSS_SELECTOR, "input.md-search__input")
                if e.is_displayed()
            ),
            False,
        ),
        "no visible search box",
    )
    box.send_keys(query)
    results = _wait(
        driver,
        lambda d: d.find_elements(By.CSS_SELECTOR, "li.md-search-result__item a") or False,
        f"no search results for {query!r}",
    )
    hrefs = [r.get_attribute("href") for r in results]
    assert all(h.startswith(base) for h in hrefs), hrefs
    if query == "oracle":
        assert any("/oracles/" in h for h in hrefs), hrefs
    else:
        assert any("/envs/ICL-MarkovChain-v0/" in h for h in hrefs), hrefs
