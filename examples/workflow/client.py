"""Pushes a batch of images through the resize -> watermark -> store pipeline and checks that every one
arrived in the store exactly once.

    python client.py --items 40 [--batch NAME] [--ns 127.0.0.1:9090]
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
import uuid

import pyrorpc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--batch", default=None, help="item id prefix (default: random); reuse it to re-run a batch")
    parser.add_argument("--ns", default=None, help="name server HOST:PORT (default: $PYRORPC_NS or 127.0.0.1:9090)")
    args = parser.parse_args()
    batch = args.batch or uuid.uuid4().hex[:6]
    items = [{"id": f"{batch}-{i:04d}", "width": 1200 + 40 * i, "height": 900, "steps": []}
             for i in range(args.items)]

    started = time.perf_counter()
    receipts = []
    with pyrorpc.Pool("resize", ns=args.ns) as resize, pyrorpc.Pool("store", ns=args.ns) as store:
        # each call returns once its item is stored: resize hands it to watermark, watermark to store
        for n, receipt in enumerate(resize.process.map(items), 1):
            receipts.append(receipt)
            if n % 10 == 0 or n == len(items):
                print(f"{n}/{len(items)} items through the pipeline", flush=True)
        took = time.perf_counter() - started
        stored = {i["id"]: i for i in store.items() if i["id"].startswith(batch + "-")}
        summary = store.summary()

    wrong = []
    for item in items:
        got = stored.get(item["id"])
        kinds = [s.split("@")[0] for s in got["steps"]] if got else None
        if got is None or kinds != ["resize", "watermark", "store"] or max(got["width"], got["height"]) != 256:
            wrong.append((item["id"], got))
    redelivered = sum(not r["stored"] for r in receipts)
    print(f"batch {batch}: {len(receipts)} receipts in {took:.1f} s; store holds {len(stored)}/{len(items)} items, "
          f"one copy each, with one resize, one watermark and one store step; {len(wrong)} wrong")
    print(f"store: {summary['items']} items, {summary['deliveries']} deliveries in all "
          f"({redelivered} repeated deliveries of this batch ignored by id)")
    for stage in ("resize", "watermark", "store"):
        done_by = collections.Counter(s.split("@")[1] for i in stored.values() for s in i["steps"]
                                      if s.startswith(stage + "@"))
        print(f"  {stage:<9} items per worker pid: {dict(sorted(done_by.items()))}")
    for item_id, got in wrong[:5]:
        print(f"  wrong: {item_id}: {got}")
    return 1 if wrong or len(stored) != len(items) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except pyrorpc.RpcError as exc:  # name server down, a stage without workers...: one line
        sys.exit(f"error: {exc}")
