"""Signs up users through the web app, inline and offloaded, measures request latency, then asks the mailer
which welcome mails it actually sent (with no mailer running, it says the mails wait in the app's outbox).

    python client.py --url http://127.0.0.1:8000 --requests 20 [--ns 127.0.0.1:9090]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pyrorpc


def sign_up(url: str, email: str) -> float:
    """POST one sign-up; returns the request latency in milliseconds."""
    data = urllib.parse.urlencode({"email": email}).encode()
    started = time.perf_counter()
    with urllib.request.urlopen(url, data=data, timeout=30) as resp:
        resp.read()
    return (time.perf_counter() - started) * 1000


def wait_for_app(url: str, timeout: float = 15.0) -> None:
    """Return once the app answers HTTP at all (it may still be starting when this script runs)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # it answered, if only with 404
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"error: nothing answers at {url}; is app.py running?") from None
            time.sleep(0.1)


def p95(values: list[float]) -> float:
    return sorted(values)[max(0, round(0.95 * len(values)) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the sign-up app")
    parser.add_argument("--requests", type=int, default=20, help="sign-ups per mode")
    parser.add_argument("--ns", default=None, help="name server HOST:PORT (default: $PYRORPC_NS or 127.0.0.1:9090)")
    parser.add_argument("--wait", type=float, default=30.0, help="seconds to wait for the mailer to finish")
    args = parser.parse_args()
    run = uuid.uuid4().hex[:6]
    base = args.url.rstrip("/")
    wait_for_app(base + "/")

    latencies: dict[str, list[float]] = {}
    offloaded: list[str] = []
    for mode, path, label in (("inline", "/signup-inline", "handler sends the mail"),
                              ("offload", "/signup", "enqueued in the outbox")):
        sign_up(base + path, f"warmup-{mode}-{run}@example.com")  # first request opens connections
        times = []
        for i in range(args.requests):
            email = f"user{i}-{mode}-{run}@example.com"
            times.append(sign_up(base + path, email))
            if mode == "offload":
                offloaded.append(email)
        latencies[mode] = times
        print(f"{mode:<8} {'(' + label + ')':<28} {len(times)} requests  median {statistics.median(times):7.1f} ms  "
              f"p95 {p95(times):7.1f} ms", flush=True)
    ratio = statistics.median(latencies["inline"]) / statistics.median(latencies["offload"])
    print(f"offloading answers {ratio:.0f}x faster")

    # the mail still has to go out: ask every mailer worker what it sent
    with pyrorpc.Pool("mailer", ns=args.ns) as mailer:
        if not mailer.workers():
            print(f"mailer: none running; the {len(offloaded)} offloaded welcome mails wait in the app's outbox "
                  "(pyrorpc outbox status outbox.sqlite) and go out once a mailer starts")
            return 0
        deadline = time.monotonic() + args.wait
        while True:
            replies = mailer.sent.broadcast()
            sent = {a for r in replies.values() if not isinstance(r, Exception) for a in r}
            done = [a for a in offloaded if a in sent]
            if len(done) == len(offloaded) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    print(f"mailer: {len(done)}/{len(offloaded)} offloaded welcome mails sent (by {len(replies)} worker(s))")
    return 0 if len(done) == len(offloaded) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except pyrorpc.RpcError as exc:  # name server down, no mailer...: one line, not a traceback
        sys.exit(f"error: {exc}")
