"""The slow part of a sign-up: "sending" the welcome mail, a stand-in for an SMTP round trip (200-500 ms)."""

from __future__ import annotations

import random
import time


def deliver(address: str) -> float:
    """Pretend to send the welcome mail to ``address``; returns the seconds it took."""
    took = random.uniform(0.2, 0.5)
    time.sleep(took)
    return took
