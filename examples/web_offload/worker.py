"""The mailer service: sends the welcome mails the web app put in its outbox.

Set ``MAILER_LOG=FILE`` to have every mailer append one line per mail it sent (``ADDRESS PID``) to FILE:
a record of what went out that outlives the workers (the tests count it).
"""

from __future__ import annotations

import os
import threading

from mail import deliver

import pyrorpc


@pyrorpc.service("mailer")
class Mailer:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sent: list[str] = []
        self._log = os.environ.get("MAILER_LOG")

    # A plain method, not @pyrorpc.oneway: the app's outbox hears when the mail has gone out (and deletes
    # its entry) or why it failed (and keeps it, see `pyrorpc outbox status`).
    def send_welcome(self, address: str) -> None:
        took = deliver(address)
        with self._lock:
            self._sent.append(address)
            if self._log:
                with open(self._log, "a") as log:  # (one short append per line: mailers can share the file)
                    log.write(f"{address} {os.getpid()}\n")
        print(f"mailer {os.getpid()}: welcome mail to {address} sent ({took * 1000:.0f} ms)", flush=True)

    def sent(self) -> list[str]:
        """Every address this worker has sent a welcome mail to."""
        with self._lock:
            return list(self._sent)
