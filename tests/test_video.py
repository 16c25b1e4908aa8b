"""Video input (edgemm.video): clips generated here with PyAV, frames sampled as transformers samples them, the
limits (bytes, frames, pixels, seconds) refused in one line with nothing decoded past them, damaged files, and
LLaVA-NeXT-Video's video path against transformers' LlavaNextVideoForConditionalGeneration (video rows, logits,
a greedy answer) through the API, `edgemm run --video` and the server's video_url parts."""
from __future__ import annotations

import base64
import io

import numpy as np
import pytest

from edgemm.errors import EdgemmError
from edgemm.video import CLIP_COLORS as COLORS, make_clip  # noqa: F401  (other tests import make_clip from here)

av = pytest.importorskip("av", reason="video input needs PyAV (pip install edgemm[serve] or av)")

TEMPLATE = ("{% for message in messages %}{{ 'w10 ' if message['role'] == 'user' else 'w11 ' }}"
            "{% for c in message['content'] | selectattr('type', 'equalto', 'image') %}<image>{% endfor %}"
            "{% for c in message['content'] | selectattr('type', 'equalto', 'video') %}<video>{% endfor %}"
            "{% for c in message['content'] | selectattr('type', 'equalto', 'text') %}{{ ' ' + c['text'] }}"
            "{% endfor %}{{ ' </s> ' if message['role'] == 'assistant' }}{% endfor %}"
            "{% if add_generation_prompt %} w11{% endif %}")


def _one_line(e):
    assert "\n" not in str(e.value) and str(e.value)


# --------------------------------------------------------------------------- sampling, decoding
@pytest.mark.parametrize("total,n", [(10, 4), (10, 8), (7, 3), (300, 8), (5, 5), (33, 32)])
def test_sample_indices_match_transformers(total, n):
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn
    from edgemm.video import sample_indices
    want = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=4.0), num_frames=n)
    assert sample_indices(total, n) == [int(i) for i in want]
    want = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=4.0), fps=2)
    assert sample_indices(total, None, fps=2, video_fps=4.0) == [int(i) for i in want]
    assert sample_indices(3, 8) == [0, 1, 2]                 # shorter than asked: every frame (transformers errs)
    import torch                                             # InternVL's video processor's initial_shift (torch)
    want = torch.arange(total / n / 2, total, total / n).int().tolist() if n < total else list(range(total))
    assert sample_indices(total, n, shift=True) == want


@pytest.mark.parametrize("fmt,codec", [("mp4", "mpeg4"), ("mp4", "h264"), ("webm", "libvpx-vp9")])
def test_read_video_samples_the_right_frames(fmt, codec):
    from edgemm.video import read_video
    stats = {}
    frames = read_video(make_clip(10, fmt=fmt, codec=codec), 4, stats=stats)
    assert stats["indices"] == [0, 2, 5, 7] and stats["total"] == 10
    assert stats["decoded"] == 8                             # decoding stops at the last sampled frame
    for f, i in zip(frames, stats["indices"]):
        assert f.shape == (24, 32, 3) and f.dtype == np.uint8
        assert np.abs(f.astype(int).mean((0, 1)) - COLORS[i]).max() < 12, (i, f.mean((0, 1)))


def test_read_video_from_a_path(tmp_path):
    from edgemm.video import read_video
    p = tmp_path / "c.mp4"
    p.write_bytes(make_clip(5))
    assert len(read_video(p, 8)) == 5
    with pytest.raises(EdgemmError, match="not found") as e:
        read_video(tmp_path / "missing.mp4")
    _one_line(e)


# --------------------------------------------------------------------------- limits: nothing decoded past them
@pytest.mark.parametrize("fmt,codec", [("mp4", "mpeg4"), ("webm", "libvpx-vp9")])
def test_over_the_frame_limit_is_refused_before_decoding(fmt, codec):
    from edgemm.video import VideoLimits, read_video
    stats = {}
    with pytest.raises(EdgemmError, match="over the limit of 6 frames") as e:
        read_video(make_clip(10, fmt=fmt, codec=codec), 4, VideoLimits(frames=6), stats=stats)
    _one_line(e)
    assert stats["decoded"] == 0


def test_over_the_pixel_byte_and_duration_limits_is_refused(tmp_path):
    from edgemm.video import VideoLimits, read_video
    clip = make_clip(10, w=64, h=48)
    for limits, what in ((VideoLimits(pixels=64 * 48 - 1), "64x48 pixels a frame, over the limit"),
                         (VideoLimits(bytes=len(clip) - 1), f"{len(clip)} bytes, over the limit"),
                         (VideoLimits(seconds=2.0), "lasts 2 s, over the limit of 2 s"),
                         (VideoLimits(work=64 * 48 * 8 - 1), "decodes 8 frames of 64x48 pixels, over the limit")):
        stats = {}
        with pytest.raises(EdgemmError, match=what) as e:
            read_video(clip, 4, limits, stats=stats)
        _one_line(e)
        assert stats["decoded"] == 0
    p = tmp_path / "big.mp4"                                 # a file: refused from its size, before it is read
    p.write_bytes(clip)
    with pytest.raises(EdgemmError, match="over the video limit"):
        read_video(p, 4, VideoLimits(bytes=100))


def test_damaged_and_hostile_files_give_one_line():
    from edgemm.video import read_video
    clip = make_clip(10)
    rng = np.random.default_rng(0)
    bad = [b"", b"\x00" * 64, rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), clip[:len(clip) // 2],
           clip[:48] + rng.integers(0, 256, len(clip) - 48, dtype=np.uint8).tobytes(),
           b"\x1a\x45\xdf\xa3" + rng.integers(0, 256, 2000, dtype=np.uint8).tobytes(),
           b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nfile:///etc/passwd\n",   # a playlist: never demuxed
           make_clip(10, w=32, h=24)[:300]]
    for data in bad:
        with pytest.raises(EdgemmError) as e:
            read_video(data, 4)
        _one_line(e)


# --------------------------------------------------------------------------- LLaVA-NeXT-Video's video path
@pytest.fixture(scope="module")
def lnv(tmp_path_factory):
    """A tiny LlavaNextVideoForConditionalGeneration imported with a video-aware chat template."""
    pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")
    import torch
    from edgemm.importers import import_checkpoint
    from .test_anyres import _processor
    from .test_import import write_tokenizer
    from .test_llava_next_video import _tiny
    d = tmp_path_factory.mktemp("lnv-video")
    model = _tiny(3)
    with torch.no_grad():            # answers in the test tokenizer's words w4..w63 (its vocabulary is 64 of 512)
        model.lm_head.weight[:4] = 0
        model.lm_head.weight[64:] = 0
    model.save_pretrained(d / "hf", safe_serialization=True)
    _processor().save_pretrained(d / "hf")
    write_tokenizer(d / "hf")
    (d / "hf" / "chat_template.jinja").write_text(TEMPLATE)
    summary = import_checkpoint(d / "hf", d / "ck", log=None)
    return model, summary, d / "ck"


def _backend(ck):
    from edgemm.runtimes import load_backend
    return load_backend("torch", model=str(ck), device="cpu")


def test_frame_pixels_match_the_processor():
    """Each frame as LLaVA-NeXT-Video's video processor takes it (shortest edge, centre crop, CLIP mean/std):
    transformers' CLIP image processor with the same settings (its video processor needs torchvision)."""
    from PIL import Image
    from transformers import CLIPImageProcessorPil
    from edgemm.config import ModelConfig, VisionConfig
    from edgemm.video import frame_pixels
    from .test_anyres import S
    cfg = ModelConfig(vision=VisionConfig(image_size=S, patch_size=4, image_mean=(0.48145466, 0.4578275, 0.40821073),
                                          image_std=(0.26862954, 0.26130258, 0.27577711), video={"pool": 2}))
    p = CLIPImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S})
    rng = np.random.default_rng(0)
    for h, w in ((16, 16), (24, 32), (40, 20), (17, 33)):
        fr = rng.integers(0, 256, (3, h, w, 3), dtype=np.uint8)
        want = p(images=[Image.fromarray(f) for f in fr], return_tensors="np")["pixel_values"]
        assert np.abs(frame_pixels(list(fr), cfg) - want).max() <= 1e-6


def test_video_rows_and_logits_match_transformers(lnv):
    import torch
    from edgemm.video import frame_pixels, read_video, video_rows
    from .test_llava_next_video import VIDEO_TOKEN
    model, summary, ck = lnv
    b = _backend(ck)
    assert b.cfg.vision.video == {"frames": 8, "pool": 2, "pool_mode": "average"}
    assert any(n.startswith("video: 8 frames, each 4 rows") for n in summary["notes"])
    for n in (3, 8):
        px = frame_pixels(read_video(make_clip(12, pattern=True), n), b.cfg)
        got = video_rows(b, px)
        with torch.no_grad():
            want = model.model.get_video_features(pixel_values_videos=torch.from_numpy(px)[None],
                                                  vision_feature_layer=-2,
                                                  vision_feature_select_strategy="default").pooler_output
        assert got.shape == tuple(want.shape) == (1, n * 4, 32)
        assert np.abs(got - want.numpy()).max() <= 1e-4
        g = torch.Generator().manual_seed(n)
        pre, post = torch.randint(5, 500, (1, 4), generator=g), torch.randint(5, 500, (1, 5), generator=g)
        ids = torch.cat([pre, torch.full((1, got.shape[1]), VIDEO_TOKEN), post], 1)
        with torch.no_grad():
            ref = model(input_ids=ids, pixel_values_videos=torch.from_numpy(px)[None]).logits[0]
            lg = b.model.forward_full([("text", pre), ("image", torch.from_numpy(got)), ("text", post)])[0]
        assert lg.shape == ref.shape and (lg - ref).abs().max().item() <= 1e-4


def _hf_answer(model, ck, clip, question, n_new=5):
    """transformers' greedy answer: the template rendered, tokenized by transformers' tokenizer, <video> expanded
    to the clip's video tokens (4 a frame here)."""
    import torch
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from transformers import PreTrainedTokenizerFast
    from edgemm.config import ModelConfig
    from edgemm.video import frame_pixels, read_video
    from .test_llava_next_video import VIDEO_TOKEN
    cfg = ModelConfig.load(ck / "config.json")
    px = torch.from_numpy(frame_pixels(read_video(clip, 8), cfg))[None]
    text = ImmutableSandboxedEnvironment().from_string(TEMPLATE).render(
        messages=[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(ck / "tokenizer.json"))
    a, z = text.split("<video>")
    bos = [tok.convert_tokens_to_ids("<s>")] if cfg.tokens.add_bos else []     # (a LLaMA tokenizer prepends it)
    ids = bos + tok(a, add_special_tokens=False)["input_ids"] + [VIDEO_TOKEN] * (px.shape[1] * 4) \
        + tok(z, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), pixel_values_videos=px, max_new_tokens=n_new,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return tok.decode(out[0, len(ids):].tolist())


def test_answer_and_edgemm_run_video_match_transformers(lnv, tmp_path):
    from click.testing import CliRunner
    from edgemm.cli import main
    from edgemm.generation import ChatSession, GenerationConfig
    from edgemm.video import clip_rows
    model, _, ck = lnv
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(make_clip(10, pattern=True))
    want = _hf_answer(model, ck, clip.read_bytes(), "w20 w21")
    b = _backend(ck)
    s = ChatSession(b, GenerationConfig(max_new_tokens=5, ignore_eos=True))
    s.set_image_rows(*clip_rows(b, clip))
    got = s.ask("w20 w21")
    assert got.split() == want.split() and len(got.split()) == 5
    r = CliRunner().invoke(main, ["run", "--model", str(ck), "--backend", "torch", "--video", str(clip),
                                  "--max-new-tokens", "5", "w20 w21"])
    assert r.exit_code == 0, r.output
    words = r.output.strip().splitlines()[-1].split()       # (it stops at </s>, which the session above ignores)
    assert words and words == want.split()[:len(words)], r.output
    r = CliRunner().invoke(main, ["chat", "--model", str(ck), "--backend", "torch", "--max-new-tokens", "5"],
                           input=f"/video {clip}\nw20 w21\n/video {clip}.missing\n/quit\n")
    assert r.exit_code == 0 and f"(video {clip} loaded; new conversation)" in r.output, r.output
    assert " ".join(words) in r.output and "error: video not found" in r.output, r.output


def test_onnx_bundle_takes_video(lnv, tmp_path):
    """An onnx bundle of LLaVA-NeXT-Video carries its `video` stage (frames pooled between the tower and the
    projector), at the vision group's precision: the exporter checks it against the reference; int8's video stage is
    calibrated on pooled frames of its own (every Linear has static scales) and its rows on a real clip stay
    within cosine 0.99 of transformers' get_video_features; `edgemm run --bundle --video` on the fp32 bundle answers
    with transformers' greedy words (the int8 decoder of this random tiny model greedily says other words)."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    from click.testing import CliRunner
    from edgemm.cli import main
    from edgemm.export.onnx import export_onnx
    from edgemm.runtimes import load_backend
    from edgemm.video import frame_pixels, read_video, video_rows
    model, _, ck = lnv
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(make_clip(10, pattern=True))
    want = _hf_answer(model, ck, clip.read_bytes(), "w20 w21")
    import torch
    for prec in ("fp32", "int8"):
        man = export_onnx(str(ck), tmp_path / prec, precision=prec, log=None)
        v, st = man["validation"]["stages"]["video"], man["stages"]["video"]
        assert st["precision"] == prec and v["ok"], (st, v)
        assert v["cosine"] > (0.99999 if prec == "fp32" else 0.99), v
    q = man["stages"]["video"]["quantization"]
    assert q["quantized"] > 0 and q["quantized"] == man["stages"]["vision"]["quantization"]["quantized"], q
    assert not [x for x in q["layers"] if "no calibration" in str(x.get("got"))], q["layers"]
    b, ref = load_backend("ort", bundle=str(tmp_path / "fp32"), device="cpu"), _backend(ck)
    px = frame_pixels(read_video(clip.read_bytes(), 5), ref.cfg)
    assert np.abs(video_rows(b, px) - video_rows(ref, px)).max() <= 1e-4          # 5 frames: the axis is dynamic
    with torch.no_grad():
        hf = model.model.get_video_features(pixel_values_videos=torch.from_numpy(px)[None], vision_feature_layer=-2,
                                            vision_feature_select_strategy="default").pooler_output.numpy().ravel()
    got = video_rows(load_backend("ort", bundle=str(tmp_path / "int8"), device="cpu"), px).ravel()
    assert got.shape == hf.shape and got @ hf / np.linalg.norm(got) / np.linalg.norm(hf) >= 0.99
    r = CliRunner().invoke(main, ["run", "--bundle", str(tmp_path / "fp32"), "--backend", "ort", "--video",
                                  str(clip), "--max-new-tokens", "5", "w20 w21"])
    assert r.exit_code == 0, r.output
    words = r.output.strip().splitlines()[-1].split()
    assert words and words == want.split()[:len(words)], (r.output, want)


def test_trt_bundle_takes_video(lnv, tmp_path):
    """A trt bundle of LLaVA-NeXT-Video (Q/DQ graphs; engines not built here) carries the video stage at the vision
    group's precision, with its profile (a clip's frames at once) and its check; the graphs on onnxruntime give rows
    within cosine 0.99 of transformers' get_video_features on a real clip, and `edgemm run --bundle --backend trt
    --device cpu --video` answers."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    import torch
    from click.testing import CliRunner
    from edgemm.cli import main
    from edgemm.export.trt import export_trt
    from edgemm.runtimes import load_backend
    from edgemm.video import frame_pixels, read_video, video_rows
    model, _, ck = lnv
    man = export_trt(str(ck), tmp_path / "b", precision="int8", no_build=True, log=None)
    st, v = man["stages"]["video"], man["validation"]["stages"]["video"]
    assert st["precision"] == "int8" and st["quantization"]["quantized"] > 0 and v["ok"] and v["cosine"] > 0.99, v
    prof = man["trt"]["profiles"][man["trt"]["device_class"]]
    assert prof["video"]["pixels"]["max"][0] == 8 and prof["decoder_image"]["image_rows"]["max"][1] >= 8 * 4
    b = load_backend("trt", bundle=str(tmp_path / "b"), device="cpu")
    px = frame_pixels(read_video(make_clip(10, pattern=True), 8), b.cfg)
    got = video_rows(b, px).ravel()
    with torch.no_grad():
        hf = model.model.get_video_features(pixel_values_videos=torch.from_numpy(px)[None], vision_feature_layer=-2,
                                            vision_feature_select_strategy="default").pooler_output.numpy().ravel()
    assert got.shape == hf.shape and got @ hf / np.linalg.norm(got) / np.linalg.norm(hf) >= 0.99
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(make_clip(10, pattern=True))
    r = CliRunner().invoke(main, ["run", "--bundle", str(tmp_path / "b"), "--backend", "trt", "--device", "cpu",
                                  "--video", str(clip), "--max-new-tokens", "3", "w20 w21"])
    assert r.exit_code == 0 and r.output.strip(), r.output


def test_run_video_refusals_are_one_line(lnv, tmp_path):
    from click.testing import CliRunner
    from edgemm.cli import main
    _, _, ck = lnv
    clip = tmp_path / "c.mp4"
    clip.write_bytes(make_clip(4))
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 500)
    for args, what in ((["--model", "tiny-shapes", "--video", str(clip)], "takes no video input"),
                       (["--model", str(ck), "--video", str(bad)], "does not decode"),
                       (["--model", str(ck), "--video", str(clip), "--image", str(clip)], "not both")):
        r = CliRunner().invoke(main, ["run", "--backend", "torch", *args, "w20"])
        assert r.exit_code == 2 and what in r.output and len(r.output.strip().splitlines()) == 1, r.output


# --------------------------------------------------------------------------- the server's video_url parts
def test_serve_refuses_video_for_a_model_without_it():
    from edgemm.config import get_preset
    from edgemm.serve.api import APIError
    from edgemm.serve.videos import video_urls
    msg = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AA"}},
                                        {"type": "text", "text": "what happens?"}]}]
    with pytest.raises(APIError, match="takes no video input") as e:
        video_urls(get_preset("tiny-shapes"), msg)
    assert e.value.status == 400
    assert video_urls(get_preset("tiny-shapes"), [{"role": "user", "content": "hi"}]) == []


def test_serve_video_url(lnv):
    pytest.importorskip("fastapi", reason="needs the serve extra")
    openai = pytest.importorskip("openai", reason="needs the test extra (openai)")
    from .test_serve import Server
    model, _, ck = lnv
    clip = make_clip(10, pattern=True)
    want = _hf_answer(model, ck, clip, "w20 w21")
    url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    s = Server("--model", str(ck), "--backend", "torch", "--max-tokens", "16", "--max-image-pixels", "2000")
    try:
        c = s.client()
        msg = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                            {"type": "text", "text": "w20 w21"}]}]
        r = c.chat.completions.create(model="ck", messages=msg, max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].message.content.split() == want.split()
        assert r.usage.prompt_tokens == 1 + 1 + 8 * 4 + 3            # <s> w10, 8 frames x 4 rows, w20 w21 w11
        big = "data:video/mp4;base64," + base64.b64encode(make_clip(3, w=64, h=48)).decode()
        for u, what in ((big, "over the limit of 2000 pixels"), ("data:video/mp4;base64,AAAA", "empty or truncated"),
                        ("data:video/mp4;base64," + base64.b64encode(b"\x00" * 99).decode(), "not an mp4/mov"),
                        ("https://example.com/a.mp4", "data URIs"), ("data:video/mp4;base64,@@", "base64")):
            with pytest.raises(openai.BadRequestError) as e:
                c.chat.completions.create(model="ck", max_tokens=4, messages=[{"role": "user", "content": [
                    {"type": "video_url", "video_url": {"url": u}}, {"type": "text", "text": "w20"}]}])
            assert what in e.value.body["message"] and "\n" not in e.value.body["message"], e.value.body
    finally:
        print(s.log()[-2000:])
        s.stop()


# --------------------------------------------------------------------------- InternVL: frames as images
@pytest.fixture(scope="module")
def ivl(tmp_path_factory):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")
    from .test_internvl import build_imported
    return build_imported(tmp_path_factory.mktemp("internvl-video"))


def _ivl_reference(ivl, clip, question):
    """transformers' InternVL on the clip: the frames edgemm.video samples, each a single tile from transformers'
    GotOcr2 image processor, the prompt from the checkpoint's template with <video> replaced as InternVLProcessor
    does (its replace_video_token) -> (input_ids, pixel_values)."""
    import torch
    from PIL import Image
    from transformers import GotOcr2ImageProcessorPil
    from edgemm.video import read_video
    from .test_internvl import MEAN, STD, S
    frames = read_video(clip, 8, shift=True)
    ip = GotOcr2ImageProcessorPil(size={"height": S, "width": S}, crop_to_patches=False, image_mean=MEAN,
                                  image_std=STD)
    px = ip(images=[Image.fromarray(f) for f in frames], return_tensors="pt")["pixel_values"]
    proc = ivl["proc"]
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "video"}, {"type": "text",
                                                                                      "text": question}]}],
                                    add_generation_prompt=True)
    text = text.replace("<video>", proc.replace_video_token({"pixel_values_videos": [np.zeros((len(frames), 1))]}, 0))
    return torch.tensor([proc.tokenizer(text)["input_ids"]]), px


def test_internvl_frames_as_images_match_transformers(ivl, tmp_path):
    """InternVL takes a clip's frames as images (one tile each, "FrameN: <img>...</img>" lines where its template
    puts <video>): the prompt ids, the logits and a greedy answer (`edgemm run --video`) equal transformers'."""
    import torch
    from click.testing import CliRunner
    from edgemm.chat_template import normalize_messages, segments_template
    from edgemm.cli import main
    from edgemm.generation import ChatSession, GenerationConfig
    from edgemm.video import clip_rows
    from .test_internvl import QUESTION
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(make_clip(12, pattern=True))
    ids, px = _ivl_reference(ivl, clip.read_bytes(), QUESTION)
    b = _backend(ivl["ck"])
    assert b.cfg.vision.video["frame"] == "Frame{n}: <img><image></img>" and b.cfg.vision.video["shift"]
    rows, text = clip_rows(b, clip)
    assert len(rows) == px.shape[0] == 8 and all(r.shape == (1, 4, 32) for r in rows)
    msgs = normalize_messages([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}},
                                                            {"type": "text", "text": QUESTION}]}])
    segs = segments_template(b.tokenizer, (ivl["ck"] / "chat_template.jinja").read_text(), msgs, video_text=[text])
    ctx = b.tokenizer.tok.token_to_id("<IMG_CONTEXT>")
    assert [t for k, x in segs for t in (x if k == "text" else [ctx] * rows[x].shape[1])] == ids[0].tolist()
    hf = ivl["hf"]
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px).logits[0]
        got = b.model.forward_full([(k, torch.tensor([x]) if k == "text" else torch.from_numpy(rows[x]))
                                    for k, x in segs])[0]
        assert got.shape == ref.shape and (got - ref).abs().max().item() <= 1e-4
        out = hf.generate(input_ids=ids, pixel_values=px, max_new_tokens=6, do_sample=False, eos_token_id=None)
    s = ChatSession(b, GenerationConfig(max_new_tokens=6, ignore_eos=True))
    s.set_image_rows(rows, video=text)
    s.ask(QUESTION)
    assert s.fed[-5:] == out[0, -6:-1].tolist()      # the answer's tokens fed back (the 6th is never fed)
    r = CliRunner().invoke(main, ["run", "--model", str(ivl["ck"]), "--backend", "torch", "--video", str(clip),
                                  QUESTION])
    assert r.exit_code == 0 and "Frame" not in r.output, r.output


def test_serve_video_url_frames_as_images(ivl):
    """The server's video_url for InternVL: the frames as images, the prompt as transformers builds it."""
    pytest.importorskip("fastapi", reason="needs the serve extra")
    pytest.importorskip("openai", reason="needs the test extra (openai)")
    from .test_internvl import QUESTION
    from .test_serve import Server
    clip = make_clip(12, pattern=True)
    ids, _ = _ivl_reference(ivl, clip, QUESTION)
    s = Server("--model", str(ivl["ck"]), "--backend", "torch", "--max-tokens", "8")
    try:
        url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
        r = s.client().chat.completions.create(model="ck", max_tokens=3, temperature=0, messages=[
            {"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": QUESTION}]}])
        assert r.usage.prompt_tokens == ids.shape[1] and r.choices[0].finish_reason in ("stop", "length")
    finally:
        print(s.log()[-2000:])
        s.stop()


def _onnx_bundle_answers_as_torch(ck, tmp_path, question):
    """The ort backend on the checkpoint's onnx fp32 bundle answers a clip with the torch backend's tokens."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    from edgemm.export.onnx import export_onnx
    from edgemm.generation import ChatSession, GenerationConfig
    from edgemm.runtimes import load_backend
    from edgemm.video import clip_rows
    export_onnx(str(ck), tmp_path / "b", precision="fp32", log=None)
    clip = make_clip(12, pattern=True)
    fed = []
    for b in (_backend(ck), load_backend("ort", bundle=str(tmp_path / "b"), device="cpu")):
        s = ChatSession(b, GenerationConfig(max_new_tokens=6, ignore_eos=True))
        s.set_image_rows(*clip_rows(b, clip))
        s.ask(question)
        fed.append(s.fed)
    assert fed[0] == fed[1] and len(fed[0]) > 8 * 4


def test_internvl_video_on_an_onnx_bundle(ivl, tmp_path):
    """Frames as images go through the bundle's vision stage."""
    from .test_internvl import QUESTION
    _onnx_bundle_answers_as_torch(ivl["ck"], tmp_path, QUESTION)


# --------------------------------------------------------------------------- LLaVA-OneVision's video path
@pytest.fixture(scope="module")
def ov(tmp_path_factory):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")
    from .test_llava_onevision import build_imported
    return build_imported(tmp_path_factory.mktemp("onevision-video"))


def test_llava_onevision_video_matches_transformers(ov, tmp_path):
    """LLaVA-OneVision's video rows (tower, projector, 2x bilinear downscale, one newline row), the logits with
    them where <video> stands, and greedy tokens through `edgemm run --video`'s session equal
    LlavaOnevisionForConditionalGeneration's."""
    import torch
    from click.testing import CliRunner
    from edgemm.chat_template import normalize_messages, segments_template
    from edgemm.cli import main
    from edgemm.generation import ChatSession, GenerationConfig
    from edgemm.video import clip_rows, frame_pixels, read_video, video_rows
    from .test_llava_onevision import OV_TEMPLATE, QUESTION
    hf, ck, tok = ov["hf"], ov["ck"], ov["tok"]
    b = _backend(ck)
    assert b.cfg.vision.video["pool_mode"] == "bilinear" and b.cfg.vision.video["newline"]
    clip = make_clip(12, pattern=True)
    px = frame_pixels(read_video(clip, 8), b.cfg)
    rows = video_rows(b, px)
    with torch.no_grad():
        want = hf.model.get_video_features(pixel_values_videos=torch.from_numpy(px)[None], vision_feature_layer=-1,
                                           vision_feature_select_strategy="full").pooler_output
    assert rows.shape == tuple(want.shape) == (1, 8 * 4 + 1, 32) and np.abs(rows - want.numpy()).max() <= 1e-4
    text = ov["proc"].apply_chat_template([{"role": "user", "content": [{"type": "video"},
                                                                        {"type": "text", "text": QUESTION}]}],
                                          add_generation_prompt=True)
    a, z = text.split("<video>")
    ids = tok.encode(a).ids + [tok.token_to_id("<video>")] * rows.shape[1] + tok.encode(z).ids
    msgs = normalize_messages([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}},
                                                            {"type": "text", "text": QUESTION}]}])
    segs = segments_template(b.tokenizer, OV_TEMPLATE, msgs)
    assert [t for k, x in segs for t in (x if k == "text" else [tok.token_to_id("<video>")] * rows.shape[1])] == ids
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([ids]), pixel_values_videos=torch.from_numpy(px)[None]).logits[0]
        got = b.model.forward_full([(k, torch.tensor([x]) if k == "text" else torch.from_numpy(rows))
                                    for k, x in segs])[0]
        assert (got - ref).abs().max().item() <= 1e-4
        out = hf.generate(input_ids=torch.tensor([ids]), pixel_values_videos=torch.from_numpy(px)[None],
                          max_new_tokens=6, do_sample=False, eos_token_id=None)
    s = ChatSession(b, GenerationConfig(max_new_tokens=6, ignore_eos=True))
    s.set_image_rows(*clip_rows(b, clip))
    s.ask(QUESTION)
    assert s.fed[-5:] == out[0, -6:-1].tolist()
    p = tmp_path / "c.webm"
    p.write_bytes(make_clip(6, fmt="webm", codec="libvpx-vp9"))
    r = CliRunner().invoke(main, ["run", "--model", str(ck), "--backend", "torch", "--video", str(p), QUESTION])
    assert r.exit_code == 0, r.output


def test_llava_onevision_video_on_an_onnx_bundle(ov, tmp_path):
    """The bundle's vision stage (tower + projector) on the frames, the bilinear downscale and the newline row on
    the host."""
    from .test_llava_onevision import QUESTION
    _onnx_bundle_answers_as_torch(ov["ck"], tmp_path, QUESTION)
