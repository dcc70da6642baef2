"""Crawls a site breadth-first: every level of the frontier is fetched at once over all crawler workers
with ``pool.fetch.map``; links to other sites are noted, not followed.

    python client.py http://127.0.0.1:8001/ [--max-pages 200] [--out pages.json] [--ns 127.0.0.1:9090]
"""

from __future__ import annotations

import argparse
import collections
import json
import socket
import sys
import time
import urllib.parse

import pyrorpc


def same_site(url: str, root: str) -> bool:
    a, b = urllib.parse.urlsplit(url), urllib.parse.urlsplit(root)
    return (a.scheme, a.netloc) == (b.scheme, b.netloc)


def wait_for_site(url: str, timeout: float = 15.0) -> None:
    """Return once the site accepts connections (website.py may still be starting when this script runs)."""
    parts = urllib.parse.urlsplit(url)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((parts.hostname, parts.port or 80), timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"error: nothing listens at {parts.netloc}; is website.py running?") from None
            time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("start", help="first URL, e.g. http://127.0.0.1:8001/")
    parser.add_argument("--max-pages", type=int, default=200)
    parser.add_argument("--out", default=None, help="write every fetched page (JSON) here")
    parser.add_argument("--ns", default=None, help="name server HOST:PORT (default: $PYRORPC_NS or 127.0.0.1:9090)")
    args = parser.parse_args()

    wait_for_site(args.start)
    pages: dict[str, dict] = {}
    external: set[str] = set()
    seen = {args.start}
    frontier = [args.start]
    level = 0
    started = time.perf_counter()
    with pyrorpc.Pool("crawler", ns=args.ns) as pool:
        while frontier:
            print(f"level {level}: fetching {len(frontier)} page(s)")
            for page in pool.fetch.map(frontier):  # results in frontier order
                pages[page["url"]] = page
                status = page["status"] or "ERR"
                print(f"  {status}  {page['url']}  {page['title']!r}  {len(page['links'])} links  "
                      f"[{page['worker']}]")
            next_frontier = []
            for url in frontier:
                for link in pages[url]["links"]:
                    if not same_site(link, args.start):
                        external.add(link)
                    elif link not in seen and len(seen) < args.max_pages:
                        seen.add(link)
                        next_frontier.append(link)
            frontier = next_frontier
            level += 1
    took = time.perf_counter() - started

    ok = [p for p in pages.values() if p["status"] == 200]
    broken = [p for p in pages.values() if p["status"] != 200]
    workers = collections.Counter(p["worker"] for p in pages.values())
    print(f"crawled {len(pages)} pages in {level} levels in {took:.2f} s: {len(ok)} ok, {len(broken)} broken, "
          f"{len(external)} external link(s) not followed")
    for p in broken:
        print(f"  broken: {p['url']} ({p['status'] or p['error']})")
    print(f"pages per worker: {dict(sorted(workers.items()))}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(sorted(pages.values(), key=lambda p: p["url"]), f, indent=2)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except pyrorpc.RpcError as exc:  # name server down, no worker...: one line, not a traceback
        sys.exit(f"error: {exc}")
