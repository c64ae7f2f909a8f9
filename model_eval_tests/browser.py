"""Headless Chromium for the browser tests: Debian's `chromium` driven by its `chromium-driver`
through Selenium (scripts/chromium_for_tests.sh installs both).

Selenium is given both paths, so it never tries to download a driver or a browser. The flags
follow what works on a machine with no general internet access: no background networking, no
component updates, no sync, and a fresh profile each time; `--no-sandbox` because tests run as root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from model_eval.settings import PROJECT_ROOT

ARTIFACTS = PROJECT_ROOT / "build" / "test-artifacts"
CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--window-size=1400,1000", "--hide-scrollbars")


def _programs() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def browser_or_skip() -> tuple[str, str]:
    """The browser and driver paths; skip (or fail, when MODEL_EVAL_REQUIRE_BROWSER=1) without them."""
    found = _programs()
    try:
        import selenium  # noqa: F401
    except ImportError:
        found = None
        reason = "selenium is not installed (pip install -e .[test])"
    else:
        reason = "chromium and chromedriver are not installed (scripts/chromium_for_tests.sh installs them)"
    if found is None:
        if os.environ.get("MODEL_EVAL_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + "; MODEL_EVAL_REQUIRE_BROWSER=1 makes that a failure")
        pytest.skip(reason)
    return found


@contextmanager
def chromium(width: int = 1400, height: int = 1000) -> Iterator:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = browser_or_skip()
    profile = tempfile.mkdtemp(prefix="model-eval-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    options.add_argument(f"--user-data-dir={profile}")
    # Console messages of the page, read back with get_log("browser").
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver_path, log_output=subprocess.DEVNULL)
    driver = webdriver.Chrome(service=service, options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def artifact(name: str) -> Path:
    """Where a test keeps a screenshot (git-ignored build/test-artifacts/)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name


def full_page_screenshot(driver, path: Path, max_height: int = 12000) -> Path:
    """Resize the window to the page's height first, so the picture holds the whole page."""
    height = min(max_height, int(driver.execute_script("return document.documentElement.scrollHeight")))
    width = int(driver.execute_script("return window.outerWidth"))
    driver.set_window_size(width, height + 120)
    driver.save_screenshot(str(path))
    return path
