"""Makes a batch of test images, resizes them over every worker of the thumbnail service with
``pool.resize.map`` (results in input order) behind a progress bar, and checks every thumbnail.

    python client.py --images 48 --size 128 [--out thumbs/] [--ns 127.0.0.1:9090]
"""

from __future__ import annotations

import argparse
import collections
import io
import os
import sys
import time

import click
import serpent
from PIL import Image, ImageDraw

import pyrorpc

SHAPES = [(1600, 1200), (1200, 1600), (1920, 1080), (1000, 1000), (2400, 600)]


def make_image(i: int) -> tuple[bytes, tuple[int, int]]:
    """A JPEG "photo" of one of a few shapes, drawn here so nothing binary lives in the repository."""
    w, h = SHAPES[i % len(SHAPES)]
    img = Image.new("RGB", (w, h), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))
    draw = ImageDraw.Draw(img)
    for k in range(0, max(w, h), 80):
        draw.line([(k, 0), (0, k)], fill=(255 - (k % 256), k % 256, 128), width=12)
    draw.text((20, 20), f"image {i}", fill=(255, 255, 255))
    out = io.BytesIO()
    img.save(out, "JPEG", quality=80)
    return out.getvalue(), (w, h)


def expected_size(original: tuple[int, int], box: int) -> tuple[int, int]:
    """What Image.thumbnail makes of ``original`` in a ``box`` x ``box`` square (give or take a pixel)."""
    w, h = original
    scale = min(box / w, box / h, 1.0)
    return round(w * scale), round(h * scale)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=48, help="how many test images to make")
    parser.add_argument("--size", type=int, default=128, help="thumbnail box, pixels")
    parser.add_argument("--out", default=None, help="directory to write the thumbnails to")
    parser.add_argument("--ns", default=None, help="name server HOST:PORT (default: $PYRORPC_NS or 127.0.0.1:9090)")
    args = parser.parse_args()

    images = [make_image(i) for i in range(args.images)]
    print(f"made {len(images)} test images ({sum(len(d) for d, _ in images) / 1e6:.1f} MB of JPEG)")
    thumbs = []
    with pyrorpc.Pool("thumbnails", ns=args.ns) as pool:
        started = time.perf_counter()
        jobs = [(data, args.size) for data, _shape in images]
        with click.progressbar(pool.resize.map(jobs), length=len(jobs), label="resizing",
                               show_pos=True) as bar:
            for thumb in bar:
                thumbs.append(thumb)
        took = time.perf_counter() - started

    bad = 0
    for i, ((_data, shape), thumb) in enumerate(zip(images, thumbs, strict=True)):
        data = serpent.tobytes(thumb["data"])
        with Image.open(io.BytesIO(data)) as img:
            actual = img.size
        want = expected_size(shape, args.size)
        if tuple(thumb["size"]) != actual or any(abs(a - b) > 1 for a, b in zip(actual, want, strict=True)):
            print(f"image {i}: {shape} -> {actual}, expected about {want}")
            bad += 1
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"thumb-{i:03d}.jpg"), "wb") as f:
                f.write(data)
    per_worker = collections.Counter(t["worker"] for t in thumbs)
    print(f"{len(thumbs)} thumbnails in {took:.2f} s ({len(thumbs) / took:.0f} images/s); "
          f"per worker pid: {dict(sorted(per_worker.items()))}")
    if args.out:
        print(f"wrote {len(thumbs)} thumbnails to {args.out}/")
    print(f"checked: {len(thumbs) - bad}/{len(images)} thumbnails fit {args.size}x{args.size} "
          f"with the original's aspect ratio")
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except pyrorpc.RpcError as exc:  # name server down, no worker...: one line, not a traceback
        sys.exit(f"error: {exc}")
