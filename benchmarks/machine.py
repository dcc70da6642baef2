"""What a benchmark ran on: CPU, platform, versions of Python, Pyro5, RPyC and pyrorpc (with its git commit)."""

from __future__ import annotations

import os
import platform
import subprocess
from typing import Any

import Pyro5

import pyrorpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def have_rpyc() -> bool:
    try:
        import rpyc  # noqa: F401
    except ImportError:
        return False
    return True


def _git_revision() -> str:
    """The checked-out commit, with ``+dirty`` when pyrorpc/ or nameserver/ have uncommitted changes."""
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "pyrorpc", "nameserver"], capture_output=True,
                               text=True, cwd=ROOT, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return rev + ("+dirty" if rev and dirty else "")


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {"python": platform.python_version(), "pyro5": Pyro5.__version__,
                "pyrorpc": getattr(pyrorpc, "__version__", ""), "git": _git_revision()}
    try:
        import rpyc
        versions["rpyc"] = rpyc.__version__ if isinstance(rpyc.__version__, str) else \
            ".".join(map(str, rpyc.__version__))
    except ImportError:
        pass
    return {"cpu": cpu, "cpus": os.cpu_count(), "platform": platform.platform(), "versions": versions}
