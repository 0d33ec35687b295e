"""Guide images as requests carry them (encoded PNG/JPEG/WEBP bytes): opened safely, size-checked from the header
before decoding. The denoiser opens ControlNet guides of UNet models here; the decoder opens the images it encodes
to latents (FLUX and SD3 guides)."""

from __future__ import annotations

import io

from PIL import Image

from triptych.serving.errors import InvalidArgument

MAX_GUIDE_PIXELS = 4096 * 4096  # checked from the header, before decoding (decompression bombs)
# What the proto promises, and all PIL may try: no TIFF, BMP, GIF, PSD, EPS ... decoders reachable from a request.
GUIDE_FORMATS = ("PNG", "JPEG", "WEBP")


def decode_guide_image(data: bytes, field: str) -> Image.Image:
    """Opens an encoded guide image; INVALID_ARGUMENT if it is not a decodable image or too large."""
    try:
        image = Image.open(io.BytesIO(data), formats=GUIDE_FORMATS)
        width, height = image.size
        if width * height > MAX_GUIDE_PIXELS:
            raise InvalidArgument.one(field, f"{width}x{height} exceeds {MAX_GUIDE_PIXELS} pixels")
        image.load()
    except InvalidArgument:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise InvalidArgument.one(field, f"not a decodable PNG/JPEG/WEBP image ({type(exc).__name__})") from exc
    return image
