"""Headless Chromium for the explorer's browser test and its screenshot script: Debian's chromium
and chromedriver (apt-get install chromium chromium-driver), driven by selenium, never a browser
that a tool downloads itself."""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

#: flags that work on a headless machine without a network
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def missing_browser() -> str | None:
    """Why the browser test cannot run here, or ``None`` when chromium and chromedriver are installed."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not (os.path.exists(path) or shutil.which(Path(path).name)):
            return f"{package} is not installed (apt-get install -y chromium chromium-driver)"
    return None


def _installed(path: str) -> str:
    return path if os.path.exists(path) else shutil.which(Path(path).name)


@contextmanager
def chromium(user_data_dir: Path, width: int = 1280, height: int = 1000) -> Iterator[object]:
    """A selenium Chrome driver on Debian's chromium with a fresh profile in ``user_data_dir``."""
    os.environ["SE_OFFLINE"] = "true"  # selenium's own manager must never fetch a driver or browser
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _installed(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={user_data_dir}")
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=_installed(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@contextmanager
def serving(explorer: object) -> Iterator[str]:
    """Serve ``explorer`` on a free port of 127.0.0.1 in a thread; yields the page's URL."""
    from tokenbudget.explore import make_server

    httpd = make_server(explorer, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()
        explorer.close()  # waits for a forward still running in a request thread
