"""``python -m nameserver``: run pyrorpc's name server (same options as ``pyrorpc ns start``)."""

from __future__ import annotations

import argparse
import sys

from .daemon import DEFAULT_LEASE_TTL, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nameserver", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9090, help="port to bind, 0 for any (default 9090)")
    parser.add_argument("--storage", default="memory", help="memory (default) or PATH.sqlite")
    parser.add_argument("--lease-ttl", type=float, default=DEFAULT_LEASE_TTL, help="lease TTL in seconds")
    args = parser.parse_args(argv)
    try:
        run(args.host, args.port, storage=args.storage, lease_ttl=args.lease_ttl,
            echo=lambda line: print(line, flush=True))
    except (ValueError, OSError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
