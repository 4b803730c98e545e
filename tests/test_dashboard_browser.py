"""`maskmix dashboard` in a real browser: the server on loopback, each page opened in headless
Chromium (Debian's chromium + chromedriver, installed by `make browser`, which `make test` runs),
no error element, every chart drawn (a non-blank canvas or an SVG with marks), one screenshot per
page under test-artifacts/dashboard/.

A missing browser fails this test (it does not skip): the test setup is expected to install it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests import dashboard_fixtures as fx

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts" / "dashboard"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                  "--window-size=1440,2600", "--hide-scrollbars"]
# (url path, title, charts the page draws from the real store)
PAGES = [("", "mixtures", "Mixtures", 6), ("data", "data", "Data", 5), ("training", "training", "Training", 5)]

# Count the charts, how many are drawn, and the error elements on the page.
PAGE_STATE_JS = """
const charts = Array.from(document.querySelectorAll('[data-testid="stVegaLiteChart"]'));
function drawn(chart) {
  for (const c of chart.querySelectorAll('canvas')) {
    if (!c.width || !c.height) continue;
    try {
      const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      for (let i = 3; i < px.length; i += 4) if (px[i] !== 0) return true;
    } catch (e) { return true; }  // a tainted canvas has content
  }
  for (const s of chart.querySelectorAll('svg')) {
    if (s.querySelectorAll('path, rect, line, circle, text').length > 0 && s.getBoundingClientRect().width > 0)
      return true;
  }
  return false;
}
return {
  charts: charts.length,
  drawn: charts.filter(drawn).length,
  exceptions: document.querySelectorAll('[data-testid="stException"]').length,
  errors: Array.from(document.querySelectorAll('[data-testid="stAlertContentError"]')).map(e => e.innerText),
  running: document.querySelectorAll('[data-testid="stStatusWidget"]').length,
  title: (document.querySelector('h1') || {}).innerText || '',
};
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def real_store(tmp_path_factory, ray_session) -> fx.RealStore:
    return fx.real_store(tmp_path_factory)


def _browser_binaries() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail("chromium/chromedriver not found: `make browser` installs them (apt-get install chromium "
                    "chromium-driver); the dashboard's browser test needs them")
    return chromium, driver


@pytest.fixture
def dashboard_server(real_store, tmp_path):
    """`maskmix dashboard` on a free loopback port; stopped by its pid afterwards."""
    port = free_port()
    log = open(tmp_path / "dashboard.log", "w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASKMIX_")}
    proc = subprocess.Popen([sys.executable, "-m", "infra.cli", "dashboard", "--tracking-uri", real_store.uri,
                             "--port", str(port)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"dashboard exited with {proc.returncode}:\n{(tmp_path / 'dashboard.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=5) as r:
                    if r.read().decode().strip() == "ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dashboard not healthy:\n{(tmp_path / 'dashboard.log').read_text()}")
            time.sleep(0.5)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)  # the CLI exec'd the server: this pid is the server
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        log.close()


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    chromium, driver_path = _browser_binaries()
    options = Options()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.mark.slow
@pytest.mark.e2e
def test_every_page_loads_and_draws_its_charts_in_chromium(dashboard_server, browser):
    from selenium.webdriver.support.ui import WebDriverWait

    url, proc = dashboard_server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for path, name, title, n_charts in PAGES:
        browser.get(f"{url}/{path}")

        def settled(driver):
            state = driver.execute_script(PAGE_STATE_JS)
            if state["exceptions"] or state["errors"]:
                return state
            return state if (state["title"] == title and state["charts"] >= n_charts
                             and state["drawn"] == state["charts"] and not state["running"]) else False

        state = WebDriverWait(browser, 180, poll_frequency=0.5).until(settled)
        time.sleep(1.0)  # let the last charts finish their transition before the screenshot
        state = browser.execute_script(PAGE_STATE_JS)
        browser.save_screenshot(str(ARTIFACTS / f"{name}.png"))
        assert state["exceptions"] == 0 and state["errors"] == [], (name, state)
        assert state["title"] == title
        assert state["charts"] >= n_charts and state["drawn"] == state["charts"], (name, state)
        assert (ARTIFACTS / f"{name}.png").stat().st_size > 10_000
    assert proc.poll() is None  # the server is still up after every page
