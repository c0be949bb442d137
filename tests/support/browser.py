"""Headless Chromium driven by Selenium, for the web inspector's end-to-end tests.

The browser sends basic-auth credentials on every request it makes (pages, scripts, fetches,
server-sent events) through the DevTools protocol's extra HTTP headers, as a user who typed them
into the browser's prompt would. Its console is kept (``goog:loggingPrefs``) so that a test can
see a script error or a Content-Security-Policy violation.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@contextmanager
def chromium(user: str, password: str, *, width: int = 1400, height: int = 1000) -> Iterator[webdriver.Chrome]:
    """A headless Chromium that authenticates every request as ``user``/``password``; quit at the end.
    Without Debian's browser the test is skipped, but not in CI (`.ci/run` installs it)."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        reason = f"{', '.join(missing)} not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", f"--window-size={width},{height}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": basic_auth(user, password)}})
        yield driver
    finally:
        driver.quit()


def text_of(driver: webdriver.Chrome, selector: str) -> str | None:
    """The text of the first element ``selector`` matches (hidden or not), or None if there is none."""
    return driver.execute_script("const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", selector)


def rows(driver: webdriver.Chrome, selector: str) -> list[list[str]]:
    """The data cells' texts of each row ``selector`` matches (header rows left out), read in one go
    (the page may redraw them)."""
    found = driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((r) => [...r.querySelectorAll('td')].map((c) => c.textContent));",
        selector,
    )
    return [cells for cells in found if cells]


def click_row(driver: webdriver.Chrome, table: str, column: int, text: str) -> bool:
    """Click the row of ``table`` whose cell ``column`` reads ``text``; False if no row does (or it was redrawn)."""
    for row in driver.find_elements(By.CSS_SELECTOR, f"{table} tbody tr"):
        try:
            cells = row.find_elements(By.TAG_NAME, "td")
            if len(cells) > column and cells[column].text == text:
                row.click()
                return True
        except StaleElementReferenceException:
            return False
    return False


def console_errors(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """The console's SEVERE entries since the last call (script errors, CSP violations, failed loads)."""
    return [entry for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]
