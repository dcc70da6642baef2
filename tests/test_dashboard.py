"""`pyrorpc dashboard`: the state it serves, and the page in a real headless Chromium (selenium)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

import pyrorpc
from pyrorpc.dashboard import Dashboard
from pyrorpc.testing import wait_for

SPEC = "services:Calculator"


def state(board: Dashboard) -> dict[str, Any]:
    with urllib.request.urlopen(board.url + "api/state", timeout=5) as reply:
        return json.loads(reply.read())


def rows(board: Dashboard) -> dict[str, dict[str, Any]]:
    return {w["name"]: w for s in state(board)["services"] for w in s["workers"]}


class Load:
    """A thread calling through a Pool until stopped."""

    def __init__(self, pool: pyrorpc.Pool) -> None:
        self.pool = pool
        self.stop = threading.Event()
        self.calls = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                self.pool.add(1, 2)
                self.calls += 1
            except pyrorpc.RpcError:
                time.sleep(0.05)  # (a worker SIGKILLed under us: the pool moves on)

    def __enter__(self) -> "Load":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(10)


def test_state_shows_workers_rates_and_gone_ones(nameserver, worker_factory, pool_factory):
    ns = nameserver(lease_ttl=2)
    workers = [worker_factory(SPEC, ns.ns) for _ in range(2)]
    pool = pool_factory("calc", ns=ns.ns)
    with Dashboard(pyrorpc.Settings(ns=ns.ns), port=0, interval=0.3) as board, Load(pool):
        wait_for(lambda: {w.name for w in workers} <= set(rows(board)), 10, message="both workers shown")
        wait_for(lambda: all((r["calls_per_s"] or 0) > 0 for r in rows(board).values()), 10,
                 message="calls/s of each worker")
        current = state(board)
        assert current["ns"]["ok"] and current["ns"]["services"] == 1
        (service,) = current["services"]
        assert service["name"] == "calc" and service["calls_per_s"] > 0 and len(service["history"]) >= 1
        row = rows(board)[workers[0].name]
        assert row["pid"] == workers[0].pid and row["host"] and row["last_heartbeat"] is not None
        workers[0].kill()
        t0 = time.monotonic()
        wait_for(lambda: rows(board).get(workers[0].name, {}).get("gone"), 2 + 2 + 1,
                 message="the killed worker marked gone")
        assert time.monotonic() - t0 < 2 + 2 + 1
        assert not rows(board)[workers[1].name]["gone"]


def test_read_only_and_name_server_down(nameserver):
    ns = nameserver()
    with Dashboard(pyrorpc.Settings(ns=ns.ns, connect_timeout=0.5), port=0, interval=0.2) as board:
        wait_for(lambda: state(board)["ns"]["ok"], 10, message="first poll")
        request = urllib.request.Request(board.url + "api/state", data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 405
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(board.url + "nothing", timeout=5)
        assert missing.value.code == 404
        with urllib.request.urlopen(board.url, timeout=5) as page:
            assert b"pyrorpc dashboard" in page.read()
        ns.kill()
        wait_for(lambda: not state(board)["ns"]["ok"], 10, message="name server shown down")
        assert str(ns.address) in state(board)["ns"]["error"]


def test_cli_dashboard_serves_and_refuses_bad_options(nameserver):
    ns = nameserver()
    bad = subprocess.run([sys.executable, "-m", "pyrorpc", "dashboard", "--port", "70000", "--ns", ns.ns],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "70000" in bad.stderr
    proc = subprocess.Popen([sys.executable, "-m", "pyrorpc", "dashboard", "--port", "0", "--ns", ns.ns],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("dashboard on http://127.0.0.1:"), line
        url = line.split()[2]
        wait_for(lambda: json.loads(urllib.request.urlopen(url + "api/state", timeout=5).read())["ns"]["ok"], 10,
                 message="the CLI's dashboard polls the name server")
    finally:
        proc.terminate()
        proc.wait(10)


# a real browser -------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or ("/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver")
                                                 else None)


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,900", "--no-first-run", "--disable-extensions"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # (no driver download)
    try:
        yield driver
    finally:
        driver.quit()


def shown(driver: Any) -> dict[str, str]:
    """worker name -> its state (live, draining, gone), as the page shows them now."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    try:
        return {row.get_attribute("data-worker"): row.get_attribute("data-state")
                for row in driver.find_elements(By.CSS_SELECTOR, "tr.worker")}
    except StaleElementReferenceException:  # the page redrew meanwhile
        return {}


@pytest.mark.slow
def test_page_in_headless_chromium_follows_the_fleet(browser, nameserver, worker_factory, pool_factory, tmp_path):
    ttl = 2.0
    ns = nameserver(lease_ttl=ttl)
    workers = [worker_factory(SPEC, ns.ns) for _ in range(2)]
    pool = pool_factory("calc", ns=ns.ns)
    with Dashboard(pyrorpc.Settings(ns=ns.ns), port=0) as board, Load(pool):
        browser.get(board.url)
        wait_for(lambda: {w.name: "live" for w in workers}.items() <= shown(browser).items(), 15,
                 message="each worker's name on the page")
        from selenium.webdriver.common.by import By
        assert "up" in browser.find_element(By.ID, "ns-state").text
        assert browser.find_elements(By.CSS_SELECTOR, "section.service[data-service='calc'] svg polyline")
        browser.save_screenshot(str(tmp_path / "dashboard.png"))
        victim, survivor = workers
        victim.kill()
        t0 = time.monotonic()
        wait_for(lambda: shown(browser).get(victim.name, "gone") == "gone", ttl + 2,
                 message="the SIGKILLed worker's row gone or marked gone")
        assert time.monotonic() - t0 <= ttl + 2
        assert shown(browser).get(survivor.name) == "live"
        newcomer = worker_factory(SPEC, ns.ns)
        wait_for(lambda: shown(browser).get(newcomer.name) == "live", 10, message="the new worker's row")
