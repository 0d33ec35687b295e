"""Encoding decoded images as PNG (with text metadata), JPEG or WEBP; deterministic bytes."""

from __future__ import annotations

import io

from PIL import Image, PngImagePlugin

MIME = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encode_image(image: Image.Image, fmt: str, quality: int, png_text: dict[str, str]) -> bytes:
    """PNG carries png_text as tEXt/iTXt chunks (A1111 reads "parameters"); JPEG/WEBP carry none.

    The chunks are written in key order: a protobuf map has no order (upb's iteration order changes from one
    process to the next), and the same request must give the same bytes from any gateway and decoder.
    """
    buffer = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        for key, value in sorted(png_text.items()):
            info.add_itxt(key, value) if not value.isascii() else info.add_text(key, value)
        image.save(buffer, format="PNG", pnginfo=info)
    elif fmt == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=quality)
    else:  # pragma: no cover - the servicer maps the enum
        raise ValueError(fmt)
    return buffer.getvalue()
