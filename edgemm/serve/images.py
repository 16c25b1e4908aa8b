"""Images of a request: data: URIs (always), http(s) URLs (only from hosts the server allows, fetched by
edgemm.serve.fetch), decoded within the pixel limit. Every refusal is an APIError 400 with a one-line message."""
from __future__ import annotations

import base64
import io

from .api import APIError, Limits
from .fetch import fetch_remote

ALLOWED_FORMATS = {"PNG", "JPEG", "WEBP"}


def decode_image(data: bytes, limits: Limits):
    """bytes of a png / jpeg / webp -> an RGB PIL image, within the pixel limit; APIError 400 otherwise."""
    from PIL import Image, UnidentifiedImageError
    from ..processor import to_rgb
    try:
        img = Image.open(io.BytesIO(data))
        if img.format not in ALLOWED_FORMATS:
            raise APIError(400, f"image format {img.format} is not accepted (png, jpeg, webp)", code="invalid_image")
        w, h = img.size
        if w * h > limits.image_pixels:
            raise APIError(400, f"the image is {w}x{h} pixels, over this server's limit of {limits.image_pixels} "
                                "pixels; downscale it", code="image_too_large")
        img.load()
    except APIError:
        raise
    except Image.DecompressionBombError:
        raise APIError(400, "the image is too large to decode safely", code="image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise APIError(400, "the image does not decode (not a png, jpeg or webp, or damaged)",
                       code="invalid_image") from None
    return to_rgb(img)


def fetch_image(url: str, limits: Limits) -> bytes:
    """data: URIs always; http(s) only for hosts named by --allow-remote-images, public addresses, bounded."""
    if url.startswith("data:"):
        head, _, payload = url.partition(",")
        if not head.startswith("data:image/") or not head.endswith(";base64"):
            raise APIError(400, "image_url data URIs must be data:image/<png|jpeg|webp>;base64,...",
                           code="invalid_image_url")
        try:
            return base64.b64decode(payload, validate=True)
        except ValueError:
            raise APIError(400, "the image's base64 data does not decode", code="invalid_image") from None
    return fetch_remote(url, limits)
