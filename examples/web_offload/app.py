"""A small WSGI sign-up app. ``POST /signup`` hands the welcome mail to the mailer service as a oneway
call and answers at once; ``POST /signup-inline`` sends the mail itself inside the request, for comparison.

    python app.py --port 8000 [--ns 127.0.0.1:9090]
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.parse
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from mail import deliver

import pyrorpc


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
        if path == "/signup":
            try:
                self.mailer.send_welcome.oneway(email)  # written to the socket, then we move on
            except pyrorpc.errors.NoWorkersError:
                return self.reply(start_response, "503 Service Unavailable", {"error": "no mailer running"})
            mail = "handed to the mailer"
        else:
            deliver(email)  # what the handler did before: the user waits for the SMTP round trip
            mail = "sent by the handler"
        handler_ms = (time.perf_counter() - started) * 1000
        return self.reply(start_response, "200 OK", {"email": email, "welcome_mail": mail,
                                                     "handler_ms": round(handler_ms, 2)})

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--ns", default=None, help="name server HOST:PORT (default: $PYRORPC_NS or 127.0.0.1:9090)")
    args = parser.parse_args()
    # a short timeout: a sign-up should fail fast rather than hang when no mailer is running
    with pyrorpc.Pool("mailer", ns=args.ns, timeout=5) as mailer:
        server = make_server(args.host, args.port, SignupApp(mailer), server_class=ThreadingWSGIServer,
                             handler_class=QuietHandler)
        print(f"sign-up app on http://{args.host}:{server.server_port}/ (POST /signup, POST /signup-inline)",
              flush=True)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.server_close()


if __name__ == "__main__":
    main()
