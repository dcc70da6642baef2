"""A web-process stand-in for the outbox tests: ``python delivery_client.py NS PATH FIRST COUNT`` enqueues
``mail("u<FIRST>")`` .. ``mail("u<FIRST+COUNT-1>")`` into the outbox at PATH, prints ``ENQUEUED <COUNT>``,
then keeps its sender running until killed or until its standard input closes."""

from __future__ import annotations

import sys

import pyrorpc


def main() -> None:
    ns, path, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    pool = pyrorpc.Pool("mailer", ns=ns, outbox=path)
    for i in range(first, first + count):
        pool.mail.enqueue(f"u{i}")
    print(f"ENQUEUED {count}", flush=True)
    sys.stdin.read()  # (the test closes it, or kills us)
    pool.close()


if __name__ == "__main__":
    main()
