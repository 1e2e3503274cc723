"""Headless Chromium (Debian's chromium + chromium-driver) driven by Selenium, for UI tests."""

from __future__ import annotations

import os
import shutil
import tempfile

CHROMIUM = os.environ.get("RECAP_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("RECAP_CHROMEDRIVER", "/usr/bin/chromedriver")


def browser_available() -> str | None:
    """None when a browser can be driven, else why not."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (extra: dev)"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(path) or shutil.which(path)):
            return f"{path} is missing (apt-get install chromium chromium-driver; ./dev setup does it as root)"
    return None


def headless_chromium(profile_dir: str | None = None):
    """A headless Chromium that never reaches out (no sync, no updates, no downloads of drivers)."""
    from selenium import webdriver

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not try to download anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                "--window-size=1400,1000", f"--user-data-dir={profile_dir or tempfile.mkdtemp(prefix='chromium-')}"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
