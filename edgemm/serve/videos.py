"""Videos of a request: `video_url` parts as vLLM's OpenAI-compatible server takes them, data: URIs only
(data:video/<mp4|webm|...>;base64,...), decoded within the limits (edgemm.video: the request body's bytes,
--max-image-pixels a frame, edgemm.video's frame and duration limits), then the frames' pixels for the model.
Every refusal is an APIError 400 with a one-line message."""
from __future__ import annotations

import base64
from dataclasses import dataclass, field

import numpy as np

from ..chat_template import normalize_messages
from ..errors import EdgemmError
from ..video import ClipPixels
from .api import APIError, Limits

MAX_VIDEOS = 1                 # videos per request


class VideoPixels(ClipPixels):
    """A clip's frames [F, 3, S, S] whose rows are one block (LLaVA-NeXT-Video), queued like an image's pixels; the
    engine asks it for its rows. (Frames as images are queued as images [1, 3, S, S].)"""

    def video_rows(self, backend, instruction=()) -> np.ndarray:
        """Its rows; LLaMA-VID: with its message's question (edgemm.video.question_rows)."""
        from ..video import encode_block, question_rows
        if instruction:
            return question_rows(backend, np.asarray(self), instruction)
        return encode_block(backend, self)              # (its sampled_fps: Qwen2.5-VL's temporal positions)


@dataclass
class Clips:
    """The request's clips as the prompt and the engine take them: blocks indexed after the images (one per clip,
    or one per frame), the rows each block takes, each clip's text (frames as images) or None."""
    blocks: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    texts: list | None = None


def video_urls(cfg, messages) -> list[str]:
    """The request's video urls; 400 for a model without video, or too many."""
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


def decode_video(url: str, cfg, limits: Limits) -> np.ndarray:
    """A data: URI -> the sampled frames' pixels [F, 3, S, S] for the model; APIError 400 otherwise."""
    from ..video import VideoLimits, load_clip
    head, _, payload = url.partition(",")
    if not head.startswith("data:video/") or not head.endswith(";base64"):
        raise APIError(400, "video_url takes data URIs: data:video/<mp4|webm>;base64,...", code="invalid_video_url")
    try:
        data = base64.b64decode(payload, validate=True)
    except ValueError:
        raise APIError(400, "the video's base64 data does not decode", code="invalid_video") from None
    try:
        return load_clip(data, cfg, VideoLimits(bytes=limits.body_bytes, pixels=limits.image_pixels))
    except EdgemmError as e:
        raise APIError(400, str(e), code="invalid_video") from None


async def videos_of(cfg, messages, limits: Limits) -> Clips:
    """The request's clips, decoded off the event loop (before the prompt is built: a clip's frame count sets it)."""
    import asyncio
    from ..video import clip_blocks, frame_rows, video_text
    out = Clips()
    for u in video_urls(cfg, messages):
        px = await asyncio.to_thread(decode_video, u, cfg, limits)
        blocks = clip_blocks(cfg, px)
        out.blocks += blocks if "frame" in cfg.vision.video else [px.view(VideoPixels)]
        out.rows += frame_rows(cfg, px)
        text = video_text(cfg, len(px), px)
        if text is not None:
            out.texts = (out.texts or []) + [text]
    return out
