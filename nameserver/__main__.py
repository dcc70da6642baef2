"""``python -m nameserver``: run pyrorpc's name server (same options as ``pyrorpc ns start``)."""

from __future__ import annotations

import argparse
import sys

from pyrorpc.config import Settings

from .daemon import DEFAULT_LEASE_TTL, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nameserver", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9090, help="port to bind, 0 for any (default 9090)")
    parser.add_argument("--storage", default="memory", help="memory (default), PATH.sqlite or etcd://HOST:PORT[,HOST:PORT...]")
    parser.add_argument("--lease-ttl", type=float, default=DEFAULT_LEASE_TTL, help="lease TTL in seconds")
    parser.add_argument("--secret", default=None, help="shared secret (env PYRORPC_SECRET)")
    parser.add_argument("--tls-cert", default=None, help="PEM certificate: serve TLS (env PYRORPC_TLS_CERT)")
    parser.add_argument("--tls-key", default=None, help="PEM key for --tls-cert (env PYRORPC_TLS_KEY)")
    parser.add_argument("--tls-ca", default=None, help="CA bundle to verify peers (env PYRORPC_TLS_CA)")
    parser.add_argument("--tls-mutual", action="store_true", default=None,
                        help="require client certificates signed by --tls-ca (env PYRORPC_TLS_MUTUAL)")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(secret=args.secret, tls_cert=args.tls_cert, tls_key=args.tls_key,
                                     tls_ca=args.tls_ca, tls_mutual=args.tls_mutual)
        run(args.host, args.port, storage=args.storage, lease_ttl=args.lease_ttl, settings=settings,
            echo=lambda line: print(line, flush=True))
    except (ValueError, OSError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
