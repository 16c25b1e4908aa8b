"""Video input: a clip (mp4/mov or webm/mkv) decoded with PyAV (imported lazily), its frames sampled as the model's
processor samples them, bounded before and while it decodes: bytes, frames, seconds and pixels per frame.

A clip over a limit is refused in one line (EdgemmError) before the frame that crosses it is decoded; a damaged or
hostile file gives one line, never a crash. Only the mp4 (mov) and matroska (webm) demuxers are used, chosen from
the file's first bytes, so a playlist or a demuxer that opens other files or URLs never runs.

How a model takes the frames (`VisionConfig.video`): LLaVA-NeXT-Video (`pool`): each frame resized and centre
cropped to the tower's size, through the tower, its patch grid pooled by the stride, then the projector; the rows of
all frames are the video's rows. A model without `video` takes no video.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EdgemmError

DEFAULT_FRAMES = 8            # LLaVA-NeXT-Video's model card samples 8 frames uniformly (its processor samples none)


@dataclass
class VideoLimits:
    bytes: int = 64 << 20           # the clip's size
    frames: int = 10_000            # frames a clip may have (all decoded up to the last sampled one)
    seconds: float = 3600.0         # the clip's duration
    pixels: int = 16_000_000        # width x height of a frame (serve: --max-image-pixels)


def sample_indices(total: int, num_frames: int | None = None, fps: float | None = None,
                   video_fps: float | None = None) -> list[int]:
    """transformers' default_sample_indices_fn (uniform: i * total // n), except that a clip with fewer frames than
    asked gives all of them instead of an error; fps: n from the clip's length at that rate."""
    if num_frames is None and fps:
        if not video_fps:
            raise EdgemmError("the clip does not say its frame rate; cannot sample it at a rate")
        num_frames = max(1, int(total / video_fps * fps))
    if num_frames is None or num_frames >= total:
        return list(range(total))
    return [int(i) for i in np.arange(num_frames, dtype=np.int64) * total // num_frames]


def _format(head: bytes) -> str:
    if head[4:8] == b"ftyp" or head[4:8] in (b"moov", b"mdat", b"free", b"wide"):
        return "mp4"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    raise EdgemmError("the video is not an mp4/mov or webm/mkv clip")


def _read_bytes(src, limits: VideoLimits) -> bytes:
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    else:
        p = Path(src)
        if not p.is_file():
            raise EdgemmError(f"video not found: {p}; check the path")
        size = p.stat().st_size
        if size > limits.bytes:
            raise EdgemmError(f"{p} is {size} bytes, over the video limit of {limits.bytes} bytes")
        with open(p, "rb") as f:
            data = f.read(limits.bytes + 1)
    if len(data) > limits.bytes:
        raise EdgemmError(f"the video is {len(data)} bytes, over the limit of {limits.bytes} bytes")
    if len(data) < 16:
        raise EdgemmError("the video is empty or truncated")
    return data


def _open(data: bytes, fmt: str):
    import av
    return av.open(io.BytesIO(data), format=fmt, options={"enable_drefs": "0"})


def read_video(src, num_frames: int | None = DEFAULT_FRAMES, limits: VideoLimits | None = None,
               fps: float | None = None, stats: dict | None = None) -> list[np.ndarray]:
    """A clip (path or bytes) -> its sampled frames, uint8 [H, W, 3] RGB each, within `limits`; EdgemmError in
    one line otherwise. stats (optional dict): "total" frames, "indices" sampled, "decoded" frames decoded."""
    limits = limits or VideoLimits()
    stats = {} if stats is None else stats
    stats["decoded"] = 0
    data = _read_bytes(src, limits)
    fmt = _format(data[:16])
    try:
        import av  # noqa: F401
    except ImportError:
        raise EdgemmError("video input needs PyAV: pip install av") from None
    try:
        return _decode(data, fmt, num_frames, fps, limits, stats)
    except EdgemmError:
        raise
    except MemoryError:
        raise EdgemmError("the video does not decode within memory; refusing it") from None
    except Exception as e:       # PyAV / FFmpeg errors on damaged data, of many classes
        msg = (getattr(e, "strerror", None) or str(e) or type(e).__name__).splitlines()[0][:120]
        raise EdgemmError(f"the video does not decode (damaged, or not an mp4/webm clip: {msg})") from None


def _decode(data, fmt, num_frames, fps, limits, stats) -> list[np.ndarray]:
    with _open(data, fmt) as c:
        if not c.streams.video:
            raise EdgemmError("the file has no video stream")
        s = c.streams.video[0]
        w, h = s.codec_context.width, s.codec_context.height
        if w * h > limits.pixels:
            raise EdgemmError(f"the video is {w}x{h} pixels a frame, over the limit of {limits.pixels} pixels")
        seconds = float(s.duration * s.time_base) if s.duration and s.time_base else (c.duration or 0) / 1e6
        if seconds > limits.seconds:
            raise EdgemmError(f"the video lasts {seconds:.0f} s, over the limit of {limits.seconds:.0f} s")
        rate = float(s.average_rate or s.guessed_rate or 0) or None
        total = int(s.frames or 0)
        if total <= 0:                   # webm and some mp4s do not say: count the packets (no decoding)
            for p in c.demux(s):
                total += p.size > 0
                if total > limits.frames:
                    break
    if total > limits.frames:
        raise EdgemmError(f"the video has {'over ' if not s.frames else ''}{total} frames, over the limit of "
                          f"{limits.frames} frames")
    if total < 1:
        raise EdgemmError("the video has no frames")
    idx = sample_indices(total, num_frames, fps, rate)
    stats.update(total=total, indices=idx)
    want, last, out = set(idx), idx[-1], {}
    with _open(data, fmt) as c:
        s = c.streams.video[0]
        for frame in c.decode(s):
            n = stats["decoded"]
            stats["decoded"] = n + 1
            if frame.width * frame.height > limits.pixels:
                raise EdgemmError(f"frame {n} of the video is {frame.width}x{frame.height} pixels, over the limit "
                                  f"of {limits.pixels} pixels")
            if n in want:
                out[n] = frame.to_ndarray(format="rgb24")
            if n >= last:
                break
    if len(out) < len(idx):
        raise EdgemmError(f"the video ended after {stats['decoded']} frames, before frame {last + 1} of the "
                          f"{total} it claims (damaged)")
    return [out[i] for i in idx]


# --------------------------------------------------------------------------- frames -> the model's rows
def takes_video(cfg) -> dict:
    """The model's video settings; EdgemmError in one line for a model that takes no video."""
    v = cfg.vision.video
    if not v:
        raise EdgemmError(f"this model ({cfg.name}) takes no video input (images only)")
    return v


def frame_pixels(frames, vision_cfg) -> np.ndarray:
    """Frames uint8 [H, W, 3] -> float32 [F, 3, S, S]: shortest edge resized to S (bicubic), centre crop S x S,
    normalised (LLaVA-NeXT-Video's video processor)."""
    from PIL import Image
    from .processor import normalize
    S, out = vision_cfg.image_size, []
    for f in frames:
        img = Image.fromarray(f, "RGB")
        w, h = img.size
        if (w, h) != (S, S):
            k = S / min(w, h)
            nw, nh = (S, max(S, int(h * k))) if w <= h else (max(S, int(w * k)), S)
            img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
            x, y = (nw - S) // 2, (nh - S) // 2
            img = img.crop((x, y, x + S, y + S))
        out.append(normalize(img, vision_cfg))
    return np.concatenate(out)


def video_rows(backend, pixels: np.ndarray) -> np.ndarray:
    """Frames' pixels [F, 3, S, S] -> the video's rows [1, F * R, D]: each frame through the tower, its patch grid
    pooled (LLaVA-NeXT-Video's vision_resampler), the projector."""
    v = takes_video(backend.cfg)
    if getattr(backend, "name", "") != "torch":
        raise EdgemmError(f"video rows are computed by the torch backend (--model DIR); the {backend.name} backend's "
                          "vision stage has no frame pooling")
    import torch
    import torch.nn.functional as F
    m, stride = backend.model, int(v.get("pool", 1))
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(backend.device)
        f = m.vision(x)                                             # [F, P, W] (CLS dropped)
        n, p, w = f.shape
        g = int(round(p ** 0.5))
        f = f.reshape(n, g, g, w).permute(0, 3, 1, 2)
        pool = F.max_pool2d if v.get("pool_mode") == "max" else F.avg_pool2d
        f = pool(f, stride, stride).flatten(2).transpose(1, 2)       # [F, P / stride^2, W]
        rows = m.adapter(f)
        return rows.reshape(1, -1, rows.shape[-1]).float().cpu().numpy()


def rows_per_frame(cfg) -> int:
    """Rows one frame gives (the context check before a clip is decoded)."""
    v = takes_video(cfg)
    g = cfg.vision.image_size // cfg.vision.patch_size
    return (g // int(v.get("pool", 1))) ** 2


def clip_rows(backend, src, limits: VideoLimits | None = None, num_frames: int | None = None) -> np.ndarray:
    """A clip -> its rows for the backend's model (the host's video path for `edgemm run --video`)."""
    v = takes_video(backend.cfg)
    frames = read_video(src, num_frames or v.get("frames", DEFAULT_FRAMES), limits)
    return video_rows(backend, frame_pixels(frames, backend.cfg.vision))
