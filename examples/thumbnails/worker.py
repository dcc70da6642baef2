"""The thumbnail service: resizes one image (bytes in, bytes out) with Pillow."""

from __future__ import annotations

import io
import os
from typing import Any

import serpent
from PIL import Image

import pyrorpc


@pyrorpc.service("thumbnails")
class Thumbnailer:
    @pyrorpc.idempotent  # a pure function of its input: safe to re-run on another worker
    def resize(self, image: Any, max_size: int = 128) -> dict[str, Any]:
        """Shrink ``image`` (encoded bytes, any Pillow format) to fit ``max_size`` x ``max_size``, keeping
        its aspect ratio; returns the JPEG thumbnail, its size and who made it."""
        # serpent (Pyro5's serializer) carries bytes as a base64 dict; tobytes() turns it back
        data = serpent.tobytes(image)
        with Image.open(io.BytesIO(data)) as img:
            original = img.size
            img.thumbnail((max_size, max_size))
            out = io.BytesIO()
            img.convert("RGB").save(out, "JPEG", quality=85)
            size = img.size
        return {"data": out.getvalue(), "size": list(size), "original": list(original), "worker": os.getpid()}
