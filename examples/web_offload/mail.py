"""The slow part of a sign-up: "sending" the welcome mail, a stand-in for an SMTP round trip (200-500 ms;
``MAIL_DELAY=MIN-MAX`` seconds, or one number, changes it)."""

from __future__ import annotations

import os
import random
import time


def _delay() -> tuple[float, float]:
    low, _, high = os.environ.get("MAIL_DELAY", "0.2-0.5").partition("-")
    return float(low), float(high or low)


def deliver(address: str) -> float:
    """Pretend to send the welcome mail to ``address``; returns the seconds it took."""
    took = random.uniform(*_delay())
    time.sleep(took)
    return took
