"""Debian's headless Chromium driven by Selenium through Debian's chromedriver, for the portal's tests.

Selenium blocks, and the pages are served by the test's own event loop, so every browser call runs in
a thread (``await browser.get(url)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from .conftest import missing_server

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAIT_SECONDS = 30.0  # a safety net for a page that never comes, not a measure of speed
# As the machine notes say: without the background-networking flags Chromium keeps dialling out.
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1200,900")


class Browser:
    def __init__(self, driver: Any) -> None:
        self.driver = driver

    async def run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def get(self, url: str) -> None:
        await self.run(self.driver.get, url)

    async def fill_and_submit(self, fields: dict[str, str]) -> None:
        """Fill the form's fields, click its button, and wait until the answer's page has replaced this one."""
        def act() -> None:
            from selenium.webdriver.common.by import By
            from selenium.webdriver.support import expected_conditions
            from selenium.webdriver.support.wait import WebDriverWait

            for name, value in fields.items():
                element = self.driver.find_element(By.NAME, name)
                element.clear()
                element.send_keys(value)
            page = self.driver.find_element(By.TAG_NAME, "html")
            self.driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
            WebDriverWait(self.driver, WAIT_SECONDS).until(expected_conditions.staleness_of(page))
            WebDriverWait(self.driver, WAIT_SECONDS).until(
                lambda driver: driver.execute_script("return document.readyState") == "complete")

        await self.run(act)

    async def metric(self, name: str) -> float:
        def read() -> str:
            from selenium.webdriver.common.by import By

            return str(self.driver.find_element(By.CSS_SELECTOR, f'[data-metric="{name}"]').get_attribute("data-value"))

        return float(await self.run(read))

    async def text(self) -> str:
        return str(await self.run(lambda: self.driver.find_element("tag name", "body").text))

    async def url(self) -> str:
        return str(await self.run(lambda: self.driver.current_url))

    async def cookie(self, name: str) -> dict[str, Any] | None:
        return await self.run(self.driver.get_cookie, name)  # type: ignore[no-any-return]

    async def navigation(self) -> dict[str, float]:
        """The last page load as the browser timed it (Navigation Timing: bytes and milliseconds)."""
        script = ("const n = performance.getEntriesByType('navigation')[0];"
                  "return {bytes: n.encodedBodySize, transfer: n.transferSize, ttfb: n.responseStart - n.startTime,"
                  " domContentLoaded: n.domContentLoadedEventEnd - n.startTime, load: n.loadEventEnd - n.startTime,"
                  " resources: performance.getEntriesByType('resource').length};")
        return dict(await self.run(self.driver.execute_script, script))

    async def screenshot(self, path: Path) -> None:
        """The whole page: the window grown to the document's height first."""
        def shoot() -> None:
            height = self.driver.execute_script("return document.documentElement.scrollHeight")
            self.driver.set_window_size(1200, min(int(height) + 20, 8000))
            self.driver.save_screenshot(str(path))
            self.driver.set_window_size(1200, 900)

        path.parent.mkdir(parents=True, exist_ok=True)
        await self.run(shoot)


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        missing_server(f"{CHROMIUM} and {CHROMEDRIVER} are needed (apt-get install chromium chromium-driver; "
                       "scripts/setup does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="dynabase-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = await asyncio.to_thread(webdriver.Chrome, service=Service(CHROMEDRIVER), options=options)
    try:
        yield Browser(driver)
    finally:
        await asyncio.to_thread(driver.quit)
        shutil.rmtree(profile, ignore_errors=True)
