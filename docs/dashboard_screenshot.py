"""Make docs/dashboard.png: the dashboard of a small fleet under load, in headless Chromium.

    python docs/dashboard_screenshot.py [--out docs/dashboard.png]

Starts a name server, three workers of ``calc`` and two of ``reports.daily`` (the Calculator of tests/services.py),
a Pool per service calling from a few threads, the dashboard in-process, and Debian's chromium through selenium
(``apt-get install chromium chromium-driver``; ``pip install selenium``).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
os.environ["PYTHONPATH"] = os.path.join(HERE, "..", "tests") + os.pathsep + os.environ.get("PYTHONPATH", "")

import pyrorpc  # noqa: E402
from pyrorpc.dashboard import Dashboard  # noqa: E402
from pyrorpc.testing import NameServerProcess, WorkerProcess  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "dashboard.png"))
    parser.add_argument("--seconds", type=float, default=12.0, help="load before the screenshot")
    args = parser.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    ns = NameServerProcess(lease_ttl=3)
    workers = [WorkerProcess("services:Calculator", ns.ns) for _ in range(3)]
    workers += [WorkerProcess("services:Calculator", ns.ns, args=["--service", "reports.daily"]) for _ in range(2)]
    stop = threading.Event()

    def load(service: str, method: str, args: tuple, pause: float) -> None:
        with pyrorpc.Pool(service, ns=ns.ns) as pool:
            while not stop.is_set():
                try:
                    getattr(pool, method)(*args)
                except pyrorpc.RpcError:
                    pass
                if pause:
                    time.sleep(pause)

    threads = [threading.Thread(target=load, args=("calc", "add", (1, 2), 0.0)) for _ in range(4)]
    threads += [threading.Thread(target=load, args=("calc", "slow", (0.02,), 0.0)) for _ in range(2)]
    threads += [threading.Thread(target=load, args=("reports.daily", "add", (2, 3), 0.002)) for _ in range(2)]
    for t in threads:
        t.start()
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,760"):
        options.add_argument(arg)
    try:
        with Dashboard(pyrorpc.Settings(ns=ns.ns), port=0) as board:
            driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
            try:
                driver.get(board.url)
                time.sleep(args.seconds)
                driver.save_screenshot(args.out)
            finally:
                driver.quit()
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for w in workers:
            w.kill()
        ns.kill()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
