"""Images of a request: data: URIs (always), http(s) URLs (only from hosts the server allows), decoded within
the pixel limit. Every refusal is an APIError 400 with a one-line message."""
from __future__ import annotations

import base64
import io
import ipaddress
import socket
from urllib.parse import urlparse

from .api import APIError, Limits

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


def _public_address(host: str) -> None:
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        raise APIError(400, f"cannot resolve the image host {host}", code="invalid_image_url") from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast:
            raise APIError(400, f"image host {host} resolves to a non-public address; refused",
                           code="invalid_image_url")


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
    u = urlparse(url)
    if u.scheme not in ("http", "https"):
        raise APIError(400, "image_url must be a data: URI (or http(s) where the server allows it)",
                       code="invalid_image_url")
    if not limits.remote_hosts or u.hostname not in limits.remote_hosts:
        raise APIError(400, "remote image URLs are refused by this server (start it with --allow-remote-images "
                            "HOST to allow a host); send the image as a data: URI", code="invalid_image_url")
    _public_address(u.hostname)
    import urllib.request
    req = urllib.request.Request(url, headers={"User-Agent": "edgemm"})
    try:
        with urllib.request.urlopen(req, timeout=limits.remote_seconds) as r:     # noqa: S310 (checked above)
            data = r.read(limits.remote_bytes + 1)
    except OSError as e:
        raise APIError(400, f"cannot fetch the image: {e}", code="invalid_image_url") from None
    if len(data) > limits.remote_bytes:
        raise APIError(400, "the remote image is larger than this server accepts", code="image_too_large")
    return data
