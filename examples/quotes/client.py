"""Calls the quotes service three ways: thousands of awaits at once, a long stream, an async stream.

    python client.py --quotes 2000 --days 1000000 [--ns 127.0.0.1:9090]
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
import uuid

import pyrorpc

SYMBOLS = ["ACME", "GLOBEX", "INITECH", "UMBRELLA", "HOOLI"]
TIMEOUT = 30.0  # seconds; every call carries what is left of it to the worker


async def quotes(pool: pyrorpc.Pool, count: int) -> None:
    request_id = uuid.uuid4().hex[:8]
    started = time.perf_counter()
    with pyrorpc.call_metadata(request_id=request_id):  # reaches the worker with every call below
        results = await asyncio.gather(*(pool.quote.aio(SYMBOLS[i % len(SYMBOLS)]) for i in range(count)))
    took = time.perf_counter() - started
    tagged = sum(r["request_id"] == request_id for r in results)
    left = [r["budget_left"] for r in results]
    print(f"{len(results)} quotes awaited at once in {took:.2f} s with {threading.active_count()} client threads; "
          f"{tagged} carried request id {request_id}", flush=True)
    print(f"the worker saw each call's deadline: {min(left):.1f}-{max(left):.1f} s of {TIMEOUT:g} s left", flush=True)


async def ticks(pool: pyrorpc.Pool, count: int) -> None:
    seen = [tick["n"] async for tick in pool.ticks.astream("ACME", count)]
    print(f"{len(seen)} ticks streamed in order: {seen == list(range(count))}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quotes", type=int, default=2000)
    parser.add_argument("--days", type=int, default=1_000_000)
    parser.add_argument("--ticks", type=int, default=20)
    parser.add_argument("--ns", default=None, help="name server HOST:PORT (default: $PYRORPC_NS or 127.0.0.1:9090)")
    args = parser.parse_args()

    # max_in_flight: how many aio() calls of an async method may be in flight per worker (they hold no
    # thread there, so the worker's --threads does not cap them)
    with pyrorpc.Pool("quotes", ns=args.ns, max_in_flight=max(args.quotes, 16), timeout=TIMEOUT) as pool:
        asyncio.run(quotes(pool, args.quotes))

        started = time.perf_counter()
        rows = 0
        last = None
        for row in pool.history.stream("ACME", args.days):  # items arrive as the worker makes them
            rows += 1
            last = row["day"]
        took = time.perf_counter() - started
        print(f"{rows} history rows streamed in {took:.2f} s ({rows / took:,.0f} rows/s); last day {last}",
              flush=True)

        taken = 0
        for _row in pool.history.stream("ACME", args.days):
            taken += 1
            if taken == 10:
                break  # stopping early closes the generator on the worker
        print(f"stopped a stream after {taken} rows", flush=True)

        asyncio.run(ticks(pool, args.ticks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
