"""The mailer service: sends welcome mails for the web app, which never waits for it."""

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

    @pyrorpc.oneway  # callers never wait for the mail: the call returns once it is on the socket
    def send_welcome(self, address: str) -> None:
        took = deliver(address)
        with self._lock:
            self._sent.append(address)
        print(f"mailer {os.getpid()}: welcome mail to {address} sent ({took * 1000:.0f} ms)", flush=True)

    def sent(self) -> list[str]:
        """Every address this worker has sent a welcome mail to."""
        with self._lock:
            return list(self._sent)
