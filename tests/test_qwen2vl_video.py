"""Qwen2-VL / Qwen2.5-VL video (edgemm.families.qwen2vl, edgemm.qwen2vl_pixels, edgemm.video): on tiny random
instances against transformers' Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration (the video
rows of get_video_features; logits over a chat prompt with a clip, its rows at temporal M-RoPE positions, and cached
greedy steps; `edgemm run --video` on the torch backend and onnx bundles answering its greedy ids).

transformers' Qwen2VLVideoProcessor needs torchvision, which has no build for this torch here, so its steps are
re-computed below from its code (video_processing_qwen2_vl.py: sample_frames, smart_resize, torchvision's resize of
uint8 frames (torch's native uint8 bicubic with antialias), the fused rescale and normalize, patchify with its
padding to whole temporal patches, and Qwen2VLProcessor's expansion of <|video_pad|>), the frames decoded here by
PyAV directly."""
import json

import numpy as np
import pytest
import torch

from .test_import_llava import greedy_ids, logits_and_cached_steps_match, record_answers
from .test_qwen2vl import MEAN, MERGE, PATCH, STD, TEMPLATE, _save

pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")
pytest.importorskip("av", reason="video input needs PyAV (pip install edgemm[test])")
QUESTION = "what happens in the video?"
CELL = (PATCH * MERGE) ** 2
# Qwen2.5-VL's instance reads video_preprocessor_config.json (its own budget, rate and frame bounds); Qwen2-VL's has
# none and takes preprocessor_config.json's, as transformers falls back to it (4 to 30 rows a frame, 2 a second)
VIDEO_25 = {"min_pixels": 4 * CELL, "max_pixels": 12 * CELL, "fps": 2.0, "min_frames": 2, "max_frames": 6,
            "temporal_patch_size": 2, "image_mean": MEAN, "image_std": STD}
SETTINGS = {False: {"min_pixels": 4 * CELL, "max_pixels": 30 * CELL, "fps": 2.0, "min_frames": 4, "max_frames": 768},
            True: VIDEO_25}


@pytest.fixture(scope="module", params=[False, True], ids=["qwen2-vl", "qwen2.5-vl"])
def imported(request, tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2vl-video")
    v25 = request.param
    extra = {"tokens_per_second": 2} if v25 else {}          # (the released 2.5's: 2 positions a second)
    if v25:
        (d / "src").mkdir()
        (d / "src" / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_25))
    out = _save(d, v25, **extra)
    out["v25"] = v25
    return out


def _decode_all(clip: bytes) -> tuple[list, float]:
    import io
    import av
    with av.open(io.BytesIO(clip)) as c:
        s = c.streams.video[0]
        return [f.to_ndarray(format="rgb24") for f in c.decode(s)], float(s.average_rate)


def _sample(total: int, video_fps: float, s: dict, T: int = 2) -> list[int]:
    """Qwen2VLVideoProcessor.sample_frames at `fps` (its code, num_frames unset)."""
    import math
    hi = math.floor(min(s["max_frames"], total) / T) * T
    n = min(max(total / video_fps * s["fps"], s["min_frames"]), hi, total)
    n = math.floor(n / T) * T
    return torch.arange(0, total, total / n).int().tolist() if n else list(range(total))


def _smart_resize(h, w, lo, hi, factor=PATCH * MERGE):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    return smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)


def _hf_video(frames: list, s: dict, T: int = 2):
    """The video processor's pixel_values_videos [n, 3 * T * p * p] and video_grid_thw [1, 3] (its code)."""
    import torch.nn.functional as F
    video = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)[None]       # uint8 [1, F, 3, H, W]
    h, w = _smart_resize(video.shape[-2], video.shape[-1], s["min_pixels"], s["max_pixels"])
    v = F.interpolate(video[0], size=(h, w), mode="bicubic", align_corners=False, antialias=True)[None]
    m, sd = (torch.tensor(a).view(1, 1, 3, 1, 1) * 255 for a in (MEAN, STD))
    v = (v.float() - m) / sd
    if pad := -v.shape[1] % T:
        v = torch.cat([v, v[:, -1:].expand(-1, pad, -1, -1, -1)], 1)
    gt, gh, gw = v.shape[1] // T, h // PATCH, w // PATCH
    x = v.view(1, gt, T, 3, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(gt * gh * gw, 3 * T * PATCH * PATCH), torch.tensor([[gt, gh, gw]])


def _reference(imp, clip: bytes):
    """transformers' side -> (sampled indices, prompt ids, the ids -> logits function, its video rows)."""
    from transformers import AutoTokenizer
    frames, rate = _decode_all(clip)
    s = SETTINGS[imp["v25"]]
    idx = _sample(len(frames), rate, s)
    pv, thw = _hf_video([frames[i] for i in idx], s)
    tok = AutoTokenizer.from_pretrained(imp["src"])
    text = tok.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text",
                                                                                    "text": QUESTION}]}],
                                   chat_template=TEMPLATE, add_generation_prompt=True, tokenize=False)
    n = int(thw.prod()) // MERGE ** 2                     # Qwen2VLProcessor: <|video_pad|> once per merged row
    ids = tok(text.replace("<|video_pad|>", "<|video_pad|>" * n), add_special_tokens=False)["input_ids"]
    vid = tok.convert_tokens_to_ids("<|video_pad|>")
    hf, extra = imp["hf"], {}
    if imp["v25"]:                                         # Qwen2_5_VLProcessor: T / the sampled fps
        extra["second_per_grid_ts"] = torch.tensor([2 / (len(idx) / len(frames) * rate)])
    with torch.no_grad():
        rows = hf.model.get_video_features(pixel_values_videos=pv, video_grid_thw=thw).pooler_output
    rows = torch.cat(list(rows)) if isinstance(rows, (list, tuple)) else rows

    def logits(x):
        tt = torch.tensor([[2 if t == vid else 0 for t in x]])
        with torch.no_grad():
            return hf(input_ids=torch.tensor([x]), pixel_values_videos=pv, video_grid_thw=thw, mm_token_type_ids=tt,
                      **extra).logits[0]
    return idx, ids, logits, rows


def test_import_keeps_the_temporal_kernel_and_the_video_settings(imported):
    from edgemm.checkpoint import load_checkpoint
    m, _ = load_checkpoint(imported["ck"])
    v = m.cfg.vision.video
    s = SETTINGS[imported["v25"]]
    assert v["temporal"] == 2 and v["sample"] == "qwen2vl" and m.cfg.video_stage
    assert (v["min_pixels"], v["max_pixels"], v["fps"], v["min_frames"], v["max_frames"]) == \
        (s["min_pixels"], s["max_pixels"], s["fps"], s["min_frames"], s["max_frames"])
    assert v["tokens_per_second"] == (2 if imported["v25"] else 0)
    w = imported["hf"].model.visual.patch_embed.proj.weight                     # [W, 3, T, p, p]
    got = m.vision.patch_embed_t.weight.reshape(w.shape[0], 2, 3, PATCH, PATCH).transpose(1, 2)
    assert torch.equal(got, w.float()) and torch.allclose(m.vision.patch_embed.weight, w.float().sum(2))
    assert "<video>" in (imported["ck"] / "chat_template.jinja").read_text()


@pytest.mark.parametrize("n,w,h,rate", [(10, 44, 30, 4), (7, 120, 64, 2), (1, 44, 30, 4), (30, 40, 24, 10)])
def test_clip_pixels_and_rows_match_transformers(imported, n, w, h, rate):
    """The sampled frames (a 1-frame clip: padded to a whole temporal patch), their pixels (upscaled, downscaled past
    the budget), the video stage's rows on the torch backend and their M-RoPE positions."""
    from edgemm.qwen2vl_pixels import image_positions
    from edgemm.runtimes import load_backend
    from edgemm.video import frame_rows, load_clip, read_video, video_rows
    from .test_video import make_clip
    clip = make_clip(n, w=w, h=h, rate=rate, pattern=True)
    idx, _, _, want = _reference(imported, clip)
    stats = {}
    b = load_backend("torch", model=str(imported["ck"]), device="cpu")
    px = load_clip(clip, b.cfg)
    read_video(clip, None, stats=stats)
    frames, _ = _decode_all(clip)
    pv, thw = _hf_video([frames[i] for i in idx], SETTINGS[imported["v25"]])
    ours, _ = _hf_video_of(px)
    assert len(px) == len(idx) + len(idx) % 2 and np.abs(ours - pv.numpy()).max() <= 1e-5
    rows = video_rows(b, px)
    assert rows.shape[1] == want.shape[0] == frame_rows(b.cfg, px)[0]
    assert np.abs(rows[0] - want.numpy()).max() <= 1e-4
    t, gh, gw = (int(x) for x in thw[0])
    assert rows.grid == (t, gh // MERGE, gw // MERGE)
    pos = image_positions(5, rows)
    step = 2 * 2 / (len(idx) / n * rate) if imported["v25"] else 1        # tokens_per_second * T / sampled fps
    assert pos[0].tolist() == [5 + int(np.float32(k) * np.float32(step)) for k in range(t) for _ in range(gh * gw // 4)]


def _hf_video_of(px):
    """edgemm's clip pixels [F, 3, h, w] in the processor's patch layout, for the comparison above."""
    F_, _, h, w = px.shape
    x = torch.from_numpy(np.asarray(px))[None]
    gt, gh, gw = F_ // 2, h // PATCH, w // PATCH
    x = x.view(1, gt, 2, 3, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(gt * gh * gw, -1).numpy(), (gt, gh, gw)


def test_video_prompt_logits_match_transformers(imported):
    """Logits over the chat prompt with a clip (two temporal patches at their temporal positions; the text after
    it) and cached greedy steps, within 1e-4 of the whole model's."""
    from edgemm.chat_template import normalize_messages, segments_template
    from edgemm.checkpoint import load_checkpoint
    from edgemm.runtimes import load_backend
    from edgemm.video import load_clip, video_rows
    from .test_video import make_clip
    clip = make_clip(10, w=44, h=30, rate=4, pattern=True)
    _, ids, hf_logits, _ = _reference(imported, clip)
    m, tok = load_checkpoint(imported["ck"])
    b = load_backend("torch", model=str(imported["ck"]), device="cpu")
    rows = video_rows(b, load_clip(clip, b.cfg))
    msgs = normalize_messages([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}},
                                                           {"type": "text", "text": QUESTION}]}])
    segs = segments_template(tok, (imported["ck"] / "chat_template.jinja").read_text(), msgs)
    x = torch.from_numpy(np.asarray(rows))
    x.grid, x.tstep = rows.grid, rows.tstep
    segs = [(k, torch.tensor([v]) if k == "text" else x) for k, v in segs]
    got = [t for k, v in segs for t in (v[0].tolist() if k == "text" else [None] * v.shape[1])]
    assert [t for t in got if t is not None] == [t for t, g in zip(ids, got) if g is not None] and len(got) == len(ids)
    logits_and_cached_steps_match(m, segs, ids, hf_logits)


def test_edgemm_run_video_on_torch_and_onnx_bundles(imported, monkeypatch):
    """`edgemm run --video` on the torch backend and on onnx bundles (fp32; int8, its video stage quantized with the
    vision group) answers transformers' greedy ids; the bundles' video stage validated against the reference."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    from click.testing import CliRunner
    from edgemm.cli import main
    from edgemm.export.onnx import export_onnx
    from .test_video import make_clip
    d = imported["dir"]
    clip = d / "clip.mp4"
    clip.write_bytes(make_clip(10, w=44, h=30, rate=4, pattern=True))
    _, ids, hf_logits, _ = _reference(imported, clip.read_bytes())
    eos = set(json.loads((imported["ck"] / "config.json").read_text())["tokens"]["eos"])
    want = greedy_ids(hf_logits, ids, eos)
    for prec in ("fp32", "int8"):
        man = export_onnx(str(imported["ck"]), d / f"onnx-v-{prec}", precision=prec, log=None)
        st = man["validation"]["stages"]
        assert "video" in man["stages"] and st["video"]["ok"], st
    got = record_answers(monkeypatch)
    runs = (["--model", str(imported["ck"]), "--backend", "torch"], ["--bundle", str(d / "onnx-v-fp32")])
    for args in runs:
        r = CliRunner().invoke(main, ["run", *args, "--video", str(clip), "--max-new-tokens", "4", QUESTION])
        assert r.exit_code == 0, r.output
    assert got == [want] * len(runs) and want, (got, want)
    r = CliRunner().invoke(main, ["run", "--bundle", str(d / "onnx-v-int8"), "--video", str(clip),
                                  "--max-new-tokens", "2", QUESTION])
    assert r.exit_code == 0, r.output


def test_trt_bundle_takes_video_and_its_profile_bounds_a_clip(imported, tmp_path):
    """A trt bundle (Q/DQ graphs; engines not built here) carries the video stage with its profile (whole temporal
    patches, frames of any size within the video budget, TRT_VIDEO_FRAMES at most); its graphs on onnxruntime give
    rows within cosine 0.99 of transformers' get_video_features and `edgemm run --backend trt --device cpu --video`
    answers; a clip outside the profile gets the engine's one-line refusal (checked here on the manifest alone)."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    from click.testing import CliRunner
    from edgemm.cli import main
    from edgemm.export.trt import export_trt
    from edgemm.export.trt_profiles import TRT_VIDEO_FRAMES, outside_profile
    from edgemm.runtimes import load_backend
    from edgemm.video import load_clip, video_rows
    from .test_video import make_clip
    man = export_trt(str(imported["ck"]), tmp_path / "b", precision="int8", no_build=True, log=None)
    v = man["validation"]["stages"]["video"]
    assert man["stages"]["video"]["precision"] == "int8" and v["ok"] and v["cosine"] > 0.99, v
    prof = man["trt"]["profiles"][man["trt"]["device_class"]]["video"]["pixels"]
    side = int((2 * SETTINGS[imported["v25"]]["max_pixels"]) ** 0.5) // (PATCH * MERGE) * PATCH * MERGE  # (2:1)
    frames = min(TRT_VIDEO_FRAMES, SETTINGS[imported["v25"]]["max_frames"])      # (Qwen2.5-VL's: 6)
    assert prof["min"] == [2, 3, 8, 8] and prof["max"] == [frames, 3, side, side], prof
    clip = make_clip(10, w=44, h=30, rate=4, pattern=True)
    _, _, _, want = _reference(imported, clip)
    b = load_backend("trt", bundle=str(tmp_path / "b"), device="cpu")
    px = load_clip(clip, b.cfg)
    got, want = video_rows(b, px).ravel(), want.numpy().ravel()
    assert got.shape == want.shape and got @ want / np.linalg.norm(got) / np.linalg.norm(want) >= 0.99
    assert outside_profile(man, "video", {"pixels": np.asarray(px)}) is None
    for n, w, what in ((frames + 2, 8, "too many frames"), (2, side + 8, "too wide")):
        why = outside_profile(man, "video", {"pixels": np.zeros((n, 3, 8, w), np.float32)})
        assert why and f"{n} frames of {w}x8 pixels" in why and "shorter or smaller clip" in why, (what, why)
    (tmp_path / "clip.mp4").write_bytes(clip)
    r = CliRunner().invoke(main, ["run", "--bundle", str(tmp_path / "b"), "--backend", "trt", "--device", "cpu",
                                  "--video", str(tmp_path / "clip.mp4"), "--max-new-tokens", "3", QUESTION])
    assert r.exit_code == 0 and r.output.strip(), r.output


def test_serve_video_url_answers_transformers(imported):
    """`edgemm serve` takes the clip as a video_url part (the official openai client): the prompt's token count
    and the greedy answer are transformers'."""
    pytest.importorskip("fastapi", reason="needs the serve extra")
    pytest.importorskip("openai", reason="needs the test extra (openai)")
    import base64
    from transformers import AutoTokenizer
    from .test_serve import Server
    from .test_video import make_clip
    clip = make_clip(10, w=44, h=30, rate=4, pattern=True)
    _, ids, hf_logits, _ = _reference(imported, clip)
    want = greedy_ids(hf_logits, ids, set(), n=5)
    text = AutoTokenizer.from_pretrained(imported["src"]).decode(want)
    s = Server("--model", str(imported["ck"]), "--backend", "torch", "--max-tokens", "16")
    try:
        msg = [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(clip).decode()}},
            {"type": "text", "text": QUESTION}]}]
        r = s.client().chat.completions.create(model="ck", messages=msg, max_tokens=5, temperature=0,
                                               extra_body={"ignore_eos": True})
        assert r.usage.prompt_tokens == len(ids) and r.choices[0].message.content == text, (r, text)
    finally:
        print(s.log()[-2000:])
        s.stop()


def test_gguf_bundle_refuses_video_in_one_line(imported, tmp_path):
    """llama.cpp's mtmd encodes images (its qwen2vl graph takes one frame twice): a gguf bundle refuses a clip in
    one line that names what takes it."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'edgemm[gguf]')")
    from click.testing import CliRunner
    from edgemm.cli import main
    from .test_video import make_clip
    if imported["v25"]:
        pytest.skip("the tiny Qwen2.5-VL's 16 px windows are not llama.cpp's 112 px (its gguf export refuses them)")
    r = CliRunner().invoke(main, ["export", "--model", str(imported["ck"]), "--target", "gguf", "--precision", "f32",
                                  "-o", str(tmp_path / "g")])
    assert r.exit_code == 0, r.output
    (tmp_path / "clip.mp4").write_bytes(make_clip(4, w=44, h=30, rate=4))
    r = CliRunner().invoke(main, ["run", "--bundle", str(tmp_path / "g"), "--video", str(tmp_path / "clip.mp4"),
                                  QUESTION])
    assert r.exit_code == 2 and "no video stage" in r.output and "onnx bundle" in r.output, r.output
    assert [x for x in r.output.splitlines() if x.startswith("error:")] == r.output.strip().splitlines()[-1:]
