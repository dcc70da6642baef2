"""A small WSGI sign-up app. ``POST /signup`` puts the welcome mail in a durable outbox (a SQLite file) and
answers at once; the outbox's sender hands it to a mailer worker, now or once one is up, also after the app
was killed and started again. ``POST /signup-inline`` sends the mail itself inside the request, for comparison.

    python app.py --port 8000 [--outbox outbox.sqlite] [--ns 127.0.0.1:9090]

The outbox defaults to ``outbox.sqlite`` next to this file (or ``$MAILER_OUTBOX``); see what is in it with
``pyrorpc outbox status outbox.sqlite``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
import urllib.parse
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from mail import deliver

import pyrorpc
from pyrorpc.outbox import outbox_status

DEFAULT_OUTBOX = Path(__file__).resolve().parent / "outbox.sqlite"


class SignupApp:
    """The WSGI application: one Pool to the mailer, shared by every request thread (it is thread safe)."""

    def __init__(self, mailer: pyrorpc.Pool) -> None:
        self.mailer = mailer

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        path, method = environ.get("PATH_INFO", "/"), environ["REQUEST_METHOD"]
        if path not in ("/signup", "/signup-inline"):
            return self.reply(start_response, "404 Not Found", {"error": "POST /signup or /signup-inline"})
        if method != "POST":
            return self.reply(start_response, "405 Method Not Allowed", {"error": "use POST"})
        length = int(environ.get("CONTENT_LENGTH") or 0)
        form = urllib.parse.parse_qs(environ["wsgi.input"].read(length).decode())
        email = form.get("email", [""])[0]
        if "@" not in email:
            return self.reply(start_response, "400 Bad Request", {"error": "email=... required"})
        started = time.perf_counter()
        # ... create the account here ...
        body: dict[str, Any] = {"email": email}
        if path == "/signup":
            # on disk in the outbox when this returns: the mail goes out even if we crash right after answering
            body["mail_id"] = self.mailer.send_welcome.enqueue(email)
            body["welcome_mail"] = "queued in the outbox"
        else:
            deliver(email)  # what the handler did before: the user waits for the SMTP round trip
            body["welcome_mail"] = "sent by the handler"
        body["handler_ms"] = round((time.perf_counter() - started) * 1000, 2)
        return self.reply(start_response, "200 OK", body)

    @staticmethod
    def reply(start_response: Any, status: str, body: dict[str, Any]) -> list[bytes]:
        data = json.dumps(body).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass


def stop(signo: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--outbox", default=os.environ.get("MAILER_OUTBOX", str(DEFAULT_OUTBOX)),
                        help="the outbox file (default: $MAILER_OUTBOX or outbox.sqlite next to app.py)")
    parser.add_argument("--ns", default=None, help="name server HOST:PORT (default: $PYRORPC_NS or 127.0.0.1:9090)")
    args = parser.parse_args()
    waiting = 0
    if os.path.exists(args.outbox):  # mails a previous run left undelivered (it crashed, no mailer ran...)
        status = outbox_status(args.outbox)
        waiting = status["pending"] + status["in_flight"]
    signal.signal(signal.SIGTERM, stop)  # (`kill` stops the app as Ctrl-C does: the outbox is closed cleanly)
    # the outbox's sender starts with the pool and delivers what is waiting in it first (oldest first)
    with pyrorpc.Pool("mailer", ns=args.ns, outbox=args.outbox) as mailer:
        server = make_server(args.host, args.port, SignupApp(mailer), server_class=ThreadingWSGIServer,
                             handler_class=QuietHandler)
        print(f"sign-up app on http://{args.host}:{server.server_port}/ (POST /signup, POST /signup-inline)",
              flush=True)
        print(f"outbox {args.outbox}: {waiting} mail(s) waiting from before", flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


if __name__ == "__main__":
    try:
        main()
    except pyrorpc.RpcError as exc:  # no name server...: one line, not a traceback
        raise SystemExit(f"error: {exc}") from None
