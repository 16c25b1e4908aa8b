"""Video input: a clip (mp4/mov or webm/mkv) decoded with PyAV (imported lazily), its frames sampled as the model's
processor samples them, bounded before and while it decodes: bytes, frames, seconds and pixels per frame.

A clip over a limit is refused in one line (EdgemmError) before the frame that crosses it is decoded; a damaged or
hostile file gives one line, never a crash. Only the mp4 (mov) and matroska (webm) demuxers are used, chosen from
the file's first bytes, so a playlist or a demuxer that opens other files or URLs never runs.

How a model takes the frames (`VisionConfig.video`): LLaVA-NeXT-Video (`pool`): each frame resized and centre
cropped to the tower's size, through the tower, its patch grid pooled by the stride, then the projector; the rows of
all frames are the video's rows, where the template puts `<video>`. LLaVA-OneVision: stretched (`resize`), the
projector first (`project_first`), pooled bilinear to the sides / stride rounded up, then one newline row
(`newline`). LLaMA-VID (`question`): every frame through the vision stage with the question's Q-Former ids (each
frame's context and content rows), the frames' rows in order as one block; `fps`: one frame every round(clip fps /
fps) frames from the first (the release's load_video). Frames as images (`frame`: InternVL): each frame
stretched to the tower's size, one image (the vision stage's rows) where `<image>` stands in the processor's text
for it (`frame`, `{n}` its number from 1, joined by `sep`), which replaces the template's `<video>`; `shift`: the
processor samples from the middle of each stretch (InternVL's initial_shift). Qwen2-VL (`temporal` T): frames
sampled at `fps` within min / max frames, a multiple of T (`sample` "qwen2vl"), resized as its video processor does
(edgemm.qwen2vl_pixels.clip_pixels), through the bundle's video stage, each T frames one grid of rows at its own
temporal M-RoPE position. A model without `video` takes none.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EdgemmError

DEFAULT_FRAMES = 8            # LLaVA-NeXT-Video's model card samples 8 frames uniformly (its processor samples none)


def processor_settings(src_dir) -> dict:
    """A checkpoint's video_preprocessor_config.json (num_frames, initial_shift, ...) or {}; EdgemmError if damaged."""
    import json
    p = Path(src_dir) / "video_preprocessor_config.json"
    if not p.is_file():
        return {}
    try:
        d = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        d = None
    if not isinstance(d, dict) or not (d.get("num_frames") is None or isinstance(d["num_frames"], int)
                                       and not isinstance(d["num_frames"], bool) and d["num_frames"] >= 1):
        raise EdgemmError(f"{p} is not a JSON object with a positive num_frames (or none)")
    return d


def video_settings(src_dir, how: dict) -> dict:
    """VisionConfig.video for a family: `how` (its processor's way) + the frames and, where the checkpoint's video
    processor says them, its mean and std."""
    vp = processor_settings(src_dir)
    out = {"frames": vp.get("num_frames") or DEFAULT_FRAMES, **how}
    for k in ("image_mean", "image_std"):
        if isinstance(vp.get(k), list) and len(vp[k]) == 3 and all(isinstance(x, (int, float)) for x in vp[k]):
            out[k] = [float(x) for x in vp[k]]
    return out


@dataclass
class VideoLimits:
    bytes: int = 64 << 20           # the clip's size
    frames: int = 10_000            # frames a clip may have (all decoded up to the last sampled one)
    seconds: float = 3600.0         # the clip's duration
    pixels: int = 16_000_000        # width x height of a frame (serve: --max-image-pixels)
    work: int = 4_000_000_000       # pixels decoded in all (the frames up to the last sampled one): bounds CPU time


def sample_indices(total: int, num_frames: int | None = None, fps: float | None = None,
                   video_fps: float | None = None, shift: bool = False, sampling: str = "uniform",
                   bounds: tuple = (1, 10_000, 1)) -> list[int]:
    """transformers' default_sample_indices_fn (uniform: i * total // n), or with shift InternVL's video processor's
    (arange(total / n / 2, total, total / n), in float32 as torch's), except that a clip with fewer frames than asked
    gives all of them instead of an error; fps: n from the clip's length at that rate. sampling "step": every
    round(video_fps / fps)-th frame from the first (LLaMA-VID's load_video); "smolvlm": SmolVLMVideoProcessor's
    sample_frames (at most num_frames at fps, 1 s skipped at each end of a long clip, linspace); "qwen2vl":
    Qwen2VLVideoProcessor's sample_frames with bounds = (min_frames, max_frames, temporal_patch_size): num_frames
    rounded to a multiple of T, else the clip's length at fps within the bounds, floored to a multiple of T, at
    arange(0, total, total / n) (a clip shorter than one temporal patch: all its frames)."""
    if sampling == "qwen2vl":
        import math
        import torch
        lo, hi, T = bounds
        if num_frames:
            n = min(round(num_frames / T) * T, total)
        else:
            if not video_fps:
                raise EdgemmError("the clip does not say its frame rate; cannot sample it at a rate")
            n = min(max(total / video_fps * fps, lo), math.floor(min(hi, total) / T) * T, total)
            n = math.floor(n / T) * T
        if n < 1:
            return list(range(total))
        return [int(i) for i in torch.arange(0, total, total / n).int().tolist()]
    if sampling != "uniform" and not video_fps:
        raise EdgemmError("the clip does not say its frame rate; cannot sample it at a rate")
    if sampling == "step":
        return list(range(0, total, max(1, round(video_fps / fps))))
    if sampling == "smolvlm":
        duration, skip = total / video_fps, 1
        want = max(1, min(int(round(fps * duration)), num_frames))
        a, z = 0, total - 1
        if duration - 2 * skip > num_frames * fps:
            a, z = int(skip * video_fps), int(total - skip * video_fps)
        a, z = max(0, a), min(z, total - 1)
        if a >= z:
            a, z = 0, total - 1
        return [int(i) for i in np.unique(np.linspace(a, z, want, dtype=int))]
    if num_frames is None and fps:
        if not video_fps:
            raise EdgemmError("the clip does not say its frame rate; cannot sample it at a rate")
        num_frames = max(1, int(total / video_fps * fps))
    if num_frames is None or num_frames >= total:
        return list(range(total))
    if shift:
        step = total / num_frames
        return [int(x) for x in np.arange(step / 2, total, step).astype(np.float32)]
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
               fps: float | None = None, stats: dict | None = None, shift: bool = False,
               sampling: str = "uniform", bounds: tuple = (1, 10_000, 1)) -> list[np.ndarray]:
    """A clip (path or bytes) -> its sampled frames, uint8 [H, W, 3] RGB each, within `limits`; EdgemmError in
    one line otherwise. stats (optional dict): "total" frames, "indices" sampled, "decoded" frames decoded, "fps"
    the clip's rate (None where it says none)."""
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
        return _decode(data, fmt, num_frames, fps, limits, stats, shift, sampling, bounds)
    except EdgemmError:
        raise
    except MemoryError:
        raise EdgemmError("the video does not decode within memory; refusing it") from None
    except Exception as e:       # PyAV / FFmpeg errors on damaged data, of many classes
        msg = (getattr(e, "strerror", None) or str(e) or type(e).__name__).splitlines()[0][:120]
        raise EdgemmError(f"the video does not decode (damaged, or not an mp4/webm clip: {msg})") from None


def _decode(data, fmt, num_frames, fps, limits, stats, shift, sampling, bounds) -> list[np.ndarray]:
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
    idx = sample_indices(total, num_frames, fps, rate, shift, sampling, bounds)
    stats.update(total=total, indices=idx, fps=rate)
    want, last, out, work = set(idx), idx[-1], {}, 0
    if (last + 1) * w * h > limits.work:
        raise EdgemmError(f"sampling the video decodes {last + 1} frames of {w}x{h} pixels, over the limit of "
                          f"{limits.work} pixels decoded")
    with _open(data, fmt) as c:
        s = c.streams.video[0]
        # FFmpeg's own bound before it allocates a frame (its check counts the decoder's padded buffers: a margin;
        # the exact limit is checked on each decoded frame below)
        s.codec_context.options = {"max_pixels": str(2 * limits.pixels + (1 << 20))}
        for frame in c.decode(s):
            n = stats["decoded"]
            stats["decoded"] = n + 1
            work += frame.width * frame.height
            if frame.width * frame.height > limits.pixels or work > limits.work:
                raise EdgemmError(f"frame {n} of the video is {frame.width}x{frame.height} pixels, over the limit "
                                  f"of {limits.pixels} pixels a frame or {limits.work} decoded")
            if n in want:
                out[n] = frame.to_ndarray(format="rgb24")
            if n >= last:
                break
    if len(out) < len(idx):
        raise EdgemmError(f"the video ended after {stats['decoded']} frames, before frame {last + 1} of the "
                          f"{total} it claims (damaged)")
    return [out[i] for i in idx]


CLIP_COLORS = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (250, 250, 10), (10, 250, 250), (250, 10, 250),
               (130, 130, 130), (250, 250, 250), (10, 10, 10), (200, 120, 40)]


def make_clip(n=10, w=32, h=24, fmt="mp4", codec="mpeg4", rate=4, pattern=False) -> bytes:
    """A generated clip (the tests', `edgemm bench --frames`'): n frames at `rate` a second, frame i a solid
    CLIP_COLORS[i % 10] (or, pattern, a gradient shifted by i)."""
    import fractions
    try:
        import av
    except ImportError:
        raise EdgemmError("video input needs PyAV: pip install av") from None
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fractions.Fraction(rate).limit_denominator(1000))
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        y, x = np.mgrid[0:h, 0:w]
        for i in range(n):
            if pattern:
                a = np.stack([(x * 7 + i * 20) % 256, (y * 9 + i * 30) % 256, (x + y + i * 40) % 256], -1)
            else:
                a = np.broadcast_to(np.array(CLIP_COLORS[i % len(CLIP_COLORS)]), (h, w, 3))
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(a, np.uint8), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return buf.getvalue()


# --------------------------------------------------------------------------- frames -> the model's rows
def takes_video(cfg) -> dict:
    """The model's video settings; EdgemmError in one line for a model that takes no video."""
    v = cfg.vision.video
    if not v:
        raise EdgemmError(f"this model ({cfg.name}) takes no video input (images only)")
    return v


def frame_pixels(frames, cfg) -> np.ndarray:
    """Frames uint8 [H, W, 3] -> float32 [F, 3, S, S] as the model's video processor gives them: LLaVA-NeXT-Video's
    shortest edge resized to S (bicubic) and centre crop; frames as images: stretched to S x S (bicubic)."""
    import dataclasses
    from PIL import Image
    from .processor import normalize, preprocess
    vv = takes_video(cfg)
    v = dataclasses.replace(cfg.vision, image_mean=tuple(vv.get("image_mean", cfg.vision.image_mean)),
                            image_std=tuple(vv.get("image_std", cfg.vision.image_std)))
    if vv.get("temporal"):              # Qwen2-VL: its video processor's resize, T frames a temporal patch
        from .qwen2vl_pixels import clip_pixels
        return clip_pixels(frames, cfg, v.image_mean, v.image_std)
    if vv.get("longest_edge"):          # SmolVLM: its video processor's two LANCZOS resizes (edgemm.smolvlm_tiles)
        from .smolvlm_tiles import tile_image
        w = dataclasses.replace(v, longest_edge=int(vv["longest_edge"]), image_splitting=False)
        return np.concatenate([normalize(tile_image(Image.fromarray(f, "RGB"), w)[0][0], v) for f in frames])
    if "frame" in vv or vv.get("resize") == "stretch":
        return np.concatenate([preprocess(f, v) for f in frames])
    S, out = v.image_size, []
    for f in frames:
        img = Image.fromarray(f, "RGB")
        w, h = img.size
        if (w, h) != (S, S):
            k = S / min(w, h)
            nw, nh = (S, max(S, int(h * k))) if w <= h else (max(S, int(w * k)), S)
            img = img.resize((nw, nh), Image.BICUBIC, reducing_gap=None)
            x, y = (nw - S) // 2, (nh - S) // 2
            img = img.crop((x, y, x + S, y + S))
        out.append(normalize(img, v))
    return np.concatenate(out)


def still_frames(images, cfg) -> np.ndarray:
    """Still images (paths or uint8 [H, W, 3] arrays) as a clip's frames -> float32 [F, 3, S, S] (frame_pixels):
    what calibrates and checks a quantized video stage (edgemm.calib.stats, edgemm.export.onnx)."""
    from .processor import load_image
    return frame_pixels([np.asarray(load_image(x)) for x in images], cfg)


class ClipPixels(np.ndarray):
    """A clip's frames [F, 3, S, S] that remember when they were taken: `times` (seconds, each frame's index / the
    clip's fps) and `duration` (frames / fps), which SmolVLM's prompt states; `sampled_fps` (frames sampled a second
    of the clip), which spaces Qwen2.5-VL's temporal positions. A view keeps them."""
    times: list = []
    duration: float = 0.0
    sampled_fps: float = 0.0

    def __array_finalize__(self, obj):
        for k in ("times", "duration", "sampled_fps"):
            setattr(self, k, getattr(obj, k, getattr(ClipPixels, k)))


def load_clip(src, cfg, limits: VideoLimits | None = None) -> np.ndarray:
    """A clip (path or bytes) -> its sampled frames' pixels [F, 3, S, S] for the model (ClipPixels)."""
    v, stats = takes_video(cfg), {}
    sampling = v.get("sample", "uniform")           # "step": LLaMA-VID's 1 fps; "smolvlm": its sample_frames
    n = None if sampling == "step" else v.get("frames", None if sampling == "qwen2vl" else DEFAULT_FRAMES)
    frames = read_video(src, n, limits, fps=v.get("fps"), stats=stats, shift=bool(v.get("shift")), sampling=sampling,
                        bounds=(v.get("min_frames", 1), v.get("max_frames", 10_000), v.get("temporal", 1)))
    px = frame_pixels(frames, cfg).view(ClipPixels)
    fps = stats["fps"] or 24                        # (SmolVLMProcessor's default when a clip says no rate)
    px.times, px.duration = [i / fps for i in stats["indices"]], stats["total"] / fps
    px.sampled_fps = len(stats["indices"]) / stats["total"] * stats["fps"] if stats["fps"] else 0.0
    return px


def video_text(cfg, n_frames: int, clip=None) -> str | None:
    """Frames as images: the text that stands for a clip of n frames (chat_template.FRAME where each frame's rows
    go; `{n}` its number from 1; SmolVLM: `{t}` its time MM:SS, after an intro stating the frame count in words and
    the clip's duration H:MM:SS, from `clip`'s ClipPixels times); None when the clip's rows stand as one block."""
    from .chat_template import FRAME
    from .tokenizer import IMAGE
    v = takes_video(cfg)
    if "frame" not in v:
        return None
    times = getattr(clip, "times", None) or [0.0] * n_frames
    body = v.get("sep", "\n").join(v["frame"].replace("{n}", str(i + 1)).replace("{t}", _mmss(t)).replace(IMAGE, FRAME)
                                   for i, t in zip(range(n_frames), times))
    if "intro" not in v:
        return body
    import datetime
    try:
        from num2words import num2words
    except ImportError:
        raise EdgemmError("this model's video prompt spells the frame count out: pip install num2words") from None
    dur = str(datetime.timedelta(seconds=int(getattr(clip, "duration", 0.0))))
    return v["intro"].replace("{count}", num2words(n_frames)).replace("{duration}", dur) + body + v.get("outro", "")


def _mmss(t: float) -> str:
    return f"{int(t // 60):02d}:{int(t % 60):02d}"


def frame_hw(cfg, width: int, height: int) -> tuple[int, int]:
    """The (height, width) the model's video processor gives a width x height frame."""
    if takes_video(cfg).get("temporal"):
        from .qwen2vl_pixels import smart_resize, video_config
        return smart_resize(video_config(cfg.vision), height, width)
    return cfg.vision.image_size, cfg.vision.image_size


def frame_rows(cfg, pixels) -> list[int]:
    """Rows each block of a clip's sampled frames [F, 3, h, w] takes (the context check before it is encoded)."""
    v, n_frames = takes_video(cfg), len(pixels)
    if v.get("temporal"):               # Qwen2-VL: a grid of rows per temporal patch
        from .qwen2vl_pixels import clip_grid
        t, gh, gw = clip_grid(cfg, pixels)
        return [t * gh * gw]
    if v.get("longest_edge"):           # SmolVLM: a frame is a whole image alone, its markers around its rows
        from .smolvlm_tiles import row_index
        return [len(row_index(cfg, 0, 0))] * n_frames
    if "frame" in v:
        return [cfg.image_rows_for(cfg.vision.image_size, cfg.vision.image_size)] * n_frames
    if v.get("question"):
        return [n_frames * cfg.n_image_rows]
    g, k = cfg.vision.image_size // cfg.vision.patch_size, int(v.get("pool", 1))
    side = -(-g // k) if v.get("pool_mode") == "bilinear" else g // k
    return [n_frames * side * side + bool(v.get("newline"))]


def video_rows(backend, pixels: np.ndarray) -> np.ndarray:
    """Frames' pixels [F, 3, S, S] -> the video's rows [1, F * R (+ 1), D]: LLaVA-NeXT-Video: the backend's video
    stage (each frame through the tower, its patch grid pooled, the projector: edgemm.model.encode_video; torch and
    onnx bundles); LLaVA-OneVision: the tower, the projector, the map downscaled bilinear, then the newline row (any
    backend: the vision stage is the tower + projector); Qwen2-VL: the video stage, its rows carrying the clip's grid
    (edgemm.qwen2vl_pixels.video_grid_rows)."""
    v = takes_video(backend.cfg)
    if v.get("question"):
        raise EdgemmError("this model's video rows read the question (LLaMA-VID): encode the clip with it "
                          "(edgemm.video.question_rows)")
    if v.get("project_first") and v.get("pool_mode") == "bilinear":
        return _pooled_stage_rows(backend, pixels, v)
    if v.get("temporal"):               # Qwen2-VL: the rows carry their grid and temporal step (M-RoPE positions)
        from .qwen2vl_pixels import video_grid_rows
        rows = backend.video(np.ascontiguousarray(pixels, dtype=np.float32))
        return video_grid_rows(backend.cfg, pixels, rows, getattr(pixels, "sampled_fps", 0.0))
    return np.asarray(backend.video(np.ascontiguousarray(pixels, dtype=np.float32)), np.float32)


def _pooled_stage_rows(backend, pixels: np.ndarray, v: dict) -> np.ndarray:
    """LLaVA-OneVision on any backend: the vision stage (tower + projector) on the frames, then each frame's map
    downscaled bilinear on the host (torch's taps, edgemm.anyres) and the newline row."""
    from .anyres import _bilinear
    f = np.asarray(backend.vision(np.ascontiguousarray(pixels, dtype=np.float32)), np.float32)     # [F, P, D]
    n, p, d = f.shape
    g = int(round(p ** 0.5))
    side = -(-g // int(v.get("pool", 1)))
    idx, w = _bilinear(np.arange(p).reshape(g, g), (side, side))
    f = np.einsum("fskd,sk->fsd", f[:, idx.reshape(-1, 4)], w.reshape(-1, 4))
    rows = f.reshape(1, -1, d)
    if v.get("newline"):
        rows = np.concatenate([rows, np.asarray(backend.image_newline(), np.float32)[None, None]], 1)
    return rows.astype(np.float32)


QUESTION_BATCH = 8           # frames a vision-stage call takes (LLaMA-VID): bounds its activations on long clips


def question_rows(backend, pixels: np.ndarray, instruction) -> np.ndarray:
    """LLaMA-VID: a clip's frames [F, 3, S, S] through the vision stage with the question's Q-Former (ids, mask)
    [1, T], QUESTION_BATCH frames a call -> the clip's rows [1, F * R, D], frame after frame (the release's
    vlm_attention with image_counts: each frame's context token, then its content rows)."""
    out = []
    for a in range(0, len(pixels), QUESTION_BATCH):
        px = np.ascontiguousarray(pixels[a:a + QUESTION_BATCH], dtype=np.float32)
        ins = [np.repeat(np.asarray(t, np.int64), len(px), 0) for t in instruction]
        out.append(np.asarray(backend.vision(px, *ins), np.float32))
    rows = np.concatenate(out)
    return rows.reshape(1, -1, rows.shape[-1])


def clip_blocks(cfg, pixels: np.ndarray) -> list[np.ndarray]:
    """A clip's pixels -> what the host encodes, one entry per block of rows: the whole clip (LLaVA-NeXT-Video), or
    each frame [1, 3, S, S] as an image (frames as images; SmolVLM: a whole image alone, smolvlm_tiles.GridTiles)."""
    v = takes_video(cfg)
    if v.get("longest_edge"):
        from .smolvlm_tiles import whole_image
        return [whole_image(np.asarray(pixels[i:i + 1])) for i in range(len(pixels))]
    if "frame" in v:
        return [np.asarray(pixels[i:i + 1]) for i in range(len(pixels))]
    return [pixels]


def encode_block(backend, block: np.ndarray) -> np.ndarray:
    """One block of a clip -> its rows [1, R, D] (a frame through the vision stage, as an image)."""
    if "frame" in takes_video(backend.cfg):
        from .tilings import encode_pixels
        return encode_pixels(backend, block)
    return video_rows(backend, block)


def clip_rows(backend, src, limits: VideoLimits | None = None):
    """A clip -> (its rows for the backend's model: one array, or a list of one per frame; its text for the
    template, None for one array): `edgemm run --video`'s host path (ChatSession.set_image_rows)."""
    return clip_pixel_rows(backend, load_clip(src, backend.cfg, limits))


def clip_pixel_rows(backend, px):
    """clip_rows after the clip is decoded: its sampled frames' pixels (load_clip) -> (rows, text)."""
    blocks = [encode_block(backend, b) for b in clip_blocks(backend.cfg, px)]
    text = video_text(backend.cfg, len(px), px)
    return (blocks if text is not None else blocks[0]), (text if text is not None else True)
