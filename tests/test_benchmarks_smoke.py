"""The benchmark scripts still run: each one's --smoke mode, as a subprocess."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NS_LOOKUP = os.path.join(ROOT, "benchmarks", "ns_lookup.py")
MEASURES = ("stock yplookup", "pyrorpc yplookup", "pyrorpc service_workers", "stock yplookup, server side",
            "pyrorpc service_workers, server side")


def test_ns_lookup_smoke(tmp_path: Any) -> None:
    out_json = tmp_path / "ns_lookup.json"
    done = subprocess.run([sys.executable, NS_LOOKUP, "--smoke", "--json", str(out_json)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| measure | p50 ms | p90 ms | p99 ms |" in done.stdout
    for measure in MEASURES:
        row = re.search(rf"^\| {re.escape(measure)} \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|", done.stdout, re.M)
        assert row, f"no table row for {measure}:\n{done.stdout}"
        p50, p90, p99 = map(float, row.groups())
        assert 0 < p50 <= p90 <= p99

    report = json.loads(out_json.read_text())
    assert report["config"]["smoke"] is True and report["config"]["rounds"] >= 3
    assert set(report["results"]) == set(MEASURES)
    for result in report["results"].values():
        assert len(result["rounds"]) == report["config"]["rounds"]
        assert all(math.isfinite(r["p50"]) and r["p50"] > 0 for r in result["rounds"])
        assert result["p50_min"] <= result["p50"] <= result["p50_max"]


def test_ns_lookup_rejects_bad_options() -> None:
    done = subprocess.run([sys.executable, NS_LOOKUP, "--rounds", "2"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 2
    assert "--rounds must be at least 3" in done.stderr
    assert "Traceback" not in done.stderr
