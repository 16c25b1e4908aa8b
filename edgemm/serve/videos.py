"""Videos of a request: `video_url` parts as vLLM's OpenAI-compatible server takes them, data: URIs only
(data:video/<mp4|webm|...>;base64,...), decoded within the limits (edgemm.video: the request body's bytes,
--max-image-pixels a frame, edgemm.video's frame and duration limits), then the frames' pixels for the model.
Every refusal is an APIError 400 with a one-line message."""
from __future__ import annotations

import base64

import numpy as np

from ..chat_template import normalize_messages
from ..errors import EdgemmError
from .api import APIError, Limits

MAX_VIDEOS = 1                 # videos per request


class VideoPixels(np.ndarray):
    """One clip's frames [F, 3, S, S], queued like an image's pixels; the engine asks it for its rows."""

    def video_rows(self, backend) -> np.ndarray:
        from ..video import video_rows
        return video_rows(backend, np.asarray(self))


def video_urls(cfg, messages) -> list[str]:
    """The request's video urls (after the images in the segments' indexing); 400 for a model without video."""
    try:
        urls = [u for m in normalize_messages(messages) for u in m["videos"]]
    except EdgemmError as e:
        raise APIError(400, str(e)) from None
    if urls and not cfg.vision.video:
        raise APIError(400, f"this model ({cfg.name}) takes no video input (images only)", code="invalid_video")
    if len(urls) > MAX_VIDEOS:
        raise APIError(400, f"at most {MAX_VIDEOS} video per request; the request has {len(urls)}",
                       code="invalid_video")
    return urls


def rows_bound(cfg) -> int:
    """The most rows one clip takes (its sampled frames' rows), for the context check before decoding."""
    from ..video import DEFAULT_FRAMES, rows_per_frame
    return cfg.vision.video.get("frames", DEFAULT_FRAMES) * rows_per_frame(cfg)


def decode_video(url: str, cfg, limits: Limits) -> VideoPixels:
    """A data: URI -> the sampled frames' pixels for the model; APIError 400 otherwise."""
    from ..video import DEFAULT_FRAMES, VideoLimits, frame_pixels, read_video
    head, _, payload = url.partition(",")
    if not head.startswith("data:video/") or not head.endswith(";base64"):
        raise APIError(400, "video_url takes data URIs: data:video/<mp4|webm>;base64,...", code="invalid_video_url")
    try:
        data = base64.b64decode(payload, validate=True)
    except ValueError:
        raise APIError(400, "the video's base64 data does not decode", code="invalid_video") from None
    try:
        frames = read_video(data, cfg.vision.video.get("frames", DEFAULT_FRAMES),
                            VideoLimits(bytes=limits.body_bytes, pixels=limits.image_pixels))
    except EdgemmError as e:
        raise APIError(400, str(e), code="invalid_video") from None
    return frame_pixels(frames, cfg.vision).view(VideoPixels)


async def videos_of(cfg, messages, limits: Limits) -> tuple[list, int]:
    """-> (each clip's VideoPixels, in the order the segments index them after the images; the rows they take
    less the bound the context check counted), decoded off the event loop."""
    import asyncio
    from ..video import rows_per_frame
    out, delta = [], 0
    for u in video_urls(cfg, messages):
        v = await asyncio.to_thread(decode_video, u, cfg, limits)
        delta += len(v) * rows_per_frame(cfg) - rows_bound(cfg)
        out.append(v)
    return out, delta
