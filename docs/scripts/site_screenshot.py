"""A screenshot of the documentation site's home page, for the README and the docs.

    python docs/scripts/site_screenshot.py [--out docs/images/site.png] [--site DIR]

Builds the site with ``mkdocs build --strict`` into a temporary folder (or serves an already
built ``--site DIR``), serves it with ``python -m http.server`` on a free localhost port and
saves a PNG of the home page from headless Chromium (selenium with the system chromedriver,
a fresh profile, no network). ``tests/test_docs_site.py`` uses the same helpers to browse the
built site.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from iclgym.browser import find_chrome, headless_chrome  # noqa: F401 (the site tests use both)

ROOT = Path(__file__).resolve().parents[2]


def build_site(out: Path) -> subprocess.CompletedProcess:
    """``mkdocs build --strict -d out`` from the repository root; the completed process (its
    ``returncode`` and combined output)."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(site: Path, timeout: float = 15.0) -> Iterator[str]:
    """Serve ``site`` over http on a free localhost port (the search index is fetched, so
    file:// does not do); yields the base URL and stops the server on exit."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        cwd=site,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(base + "/", timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"http.server did not start on port {port}") from None
                time.sleep(0.1)
        yield base
    finally:
        server.terminate()
        server.wait(timeout=10)


def screenshot(site: Path, out: Path, window: tuple[int, int] = (1280, 800)) -> Path:
    """A PNG of the home page of the built ``site`` at ``window`` CSS pixels."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory() as profile,
        serve(site) as base,
        headless_chrome(Path(profile), window) as driver,
    ):
        driver.get(base + "/")
        driver.execute_script("return document.fonts.ready")
        time.sleep(0.5)  # let the theme's palette and icons settle
        driver.save_screenshot(str(out))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "site.png")
    parser.add_argument("--site", type=Path, default=None, help="an already built site")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        site = args.site
        if site is None:
            site = Path(tmp) / "site"
            built = build_site(site)
            if built.returncode != 0:
                sys.exit(f"mkdocs build --strict failed:\n{built.stdout}{built.stderr}")
        print(f"wrote {screenshot(site, args.out)}")


if __name__ == "__main__":
    main()
