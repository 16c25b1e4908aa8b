"""SmolVLM's video path (edgemm.families.smolvlm, edgemm.video): frames sampled as SmolVLMVideoProcessor.sample_frames
samples them, each the whole image alone after its two LANCZOS resizes (transformers' SmolVLM image processor without
splitting: the video processor's steps, whose torchvision backend is not installed here), the prompt SmolVLMProcessor
writes around them (the frame count in words by num2words, the duration, each frame's MM:SS), checked against
transformers' SmolVLMProcessor and SmolVLMForConditionalGeneration on a tiny checkpoint; `edgemm run --video` on the
torch backend and an onnx bundle answers transformers' greedy ids."""
import json
import types

import numpy as np
import pytest
import torch

from .test_import_llava import greedy_ids, logits_and_cached_steps_match, record_answers
from .test_smolvlm import MEAN, S, STD, _hf_processor, _save

pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")
pytest.importorskip("num2words", reason="SmolVLM's video prompt needs num2words (pip install edgemm[test])")
pytest.importorskip("av", reason="video input needs PyAV (pip install edgemm[test])")
VIDEO_EDGE, MAX_FRAMES, FPS = 32, 3, 2
QUESTION = "what happens in the video?"


@pytest.fixture(scope="module")
def smv(tmp_path_factory):
    """A tiny SmolVLM with SmolVLM2's video settings (video_preprocessor_config.json's video_sampling) and the chat
    template SmolVLMProcessor uses for videos, imported."""
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE
    from edgemm.importers import import_checkpoint
    d = _save(tmp_path_factory.mktemp("smolvlm-video"))
    src = d["src"]
    (src / "video_preprocessor_config.json").write_text(json.dumps({
        "video_sampling": {"fps": FPS, "max_frames": MAX_FRAMES, "video_size": {"longest_edge": VIDEO_EDGE}},
        "max_image_size": {"longest_edge": S}, "image_mean": MEAN, "image_std": STD, "resample": 1}))
    (src / "chat_template.jinja").write_text(DEFAULT_CHAT_TEMPLATE)
    d["summary"] = import_checkpoint(src, d["dir"] / "ckv", log=None)
    d["ck"] = d["dir"] / "ckv"
    return d


def _reference(smv, clip: bytes):
    """transformers' side: the sampled indices (SmolVLMVideoProcessor.sample_frames), the prompt ids
    (SmolVLMProcessor.replace_video_token in its video chat template, its tokenizer), the frames' pixel values (its
    image processor without splitting), and the ids -> logits function."""
    from PIL import Image
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from transformers import SmolVLMImageProcessorPil
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE
    from transformers.models.smolvlm.video_processing_smolvlm import SmolVLMVideoProcessor
    from transformers.video_utils import VideoMetadata
    from edgemm.video import read_video
    stats = {}
    read_video(clip, None, stats=stats)                            # the clip's frame count and rate
    meta = VideoMetadata(total_num_frames=stats["total"], fps=stats["fps"], duration=stats["total"] / stats["fps"])
    idx = SmolVLMVideoProcessor.sample_frames(types.SimpleNamespace(num_frames=MAX_FRAMES, fps=FPS), meta,
                                              MAX_FRAMES, FPS)
    frames = read_video(clip, MAX_FRAMES, fps=FPS, sampling="smolvlm")  # (edgemm's decoder; the indices checked below)
    meta.frames_indices = idx
    proc = _hf_processor(smv["src"])
    vp = proc.replace_video_token({"pixel_values": torch.zeros(1, len(idx)), "video_metadata": [meta]}, 0)
    text = ImmutableSandboxedEnvironment().from_string(DEFAULT_CHAT_TEMPLATE).render(
        messages=[{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True).replace("<video>", vp)
    ids = proc.tokenizer(text)["input_ids"]
    ip = SmolVLMImageProcessorPil(size={"longest_edge": VIDEO_EDGE}, max_image_size={"longest_edge": S},
                                  image_mean=MEAN, image_std=STD, do_image_splitting=False)
    pv = ip(images=[[Image.fromarray(f) for f in frames]], return_tensors="pt")["pixel_values"]     # [1, F, 3, S, S]
    hf = smv["hf"]
    return list(idx), ids, pv, lambda x: hf(input_ids=torch.tensor([x]), pixel_values=pv).logits[0]


@pytest.mark.parametrize("n,rate", [(12, 4), (40, 4)])          # 3 s (no skip), 10 s (1 s skipped at each end)
def test_video_matches_transformers(smv, n, rate):
    from edgemm.chat_template import normalize_messages, segments_template
    from edgemm.checkpoint import load_checkpoint
    from edgemm.runtimes import load_backend
    from edgemm.video import clip_blocks, encode_block, frame_rows, load_clip, video_text
    from .test_video import make_clip
    clip = make_clip(n, w=40, h=24, rate=rate, pattern=True)
    idx, ids, pv, hf_logits = _reference(smv, clip)
    m, tok = load_checkpoint(smv["ck"])
    assert m.cfg.vision.video["sample"] == "smolvlm" and any(x.startswith("video: up to 3 frames")
                                                               for x in smv["summary"]["notes"])
    b = load_backend("torch", model=str(smv["ck"]), device="cpu")
    px = load_clip(clip, b.cfg)
    assert [round(t * rate) for t in px.times] == idx and np.abs(np.asarray(px) - pv[0].numpy()).max() <= 1e-5
    rows = [torch.from_numpy(np.asarray(encode_block(b, blk), np.float32)) for blk in clip_blocks(b.cfg, px)]
    assert [r.shape[1] for r in rows] == frame_rows(b.cfg, px) and len(px) == len(idx)
    msgs = normalize_messages([{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "x"}},
                                                           {"type": "text", "text": QUESTION}]}])
    segs = segments_template(tok, (smv["ck"] / "chat_template.jinja").read_text(), msgs,
                             video_text=[video_text(b.cfg, len(px), px)])
    segs = [(k, torch.tensor([x]) if k == "text" else rows[x]) for k, x in segs]
    got = [t for k, x in segs for t in (x[0].tolist() if k == "text" else [None] * x.shape[1])]
    assert [t for t in got if t is not None] == [t for t, g in zip(ids, got) if g is not None] and len(got) == len(ids)
    logits_and_cached_steps_match(m, segs, ids, hf_logits)


def test_edgemm_run_video_on_torch_and_an_onnx_bundle(smv, monkeypatch):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    from click.testing import CliRunner
    from edgemm.cli import main
    from edgemm.export.onnx import export_onnx
    from .test_video import make_clip
    clip = smv["dir"] / "clip.mp4"
    clip.write_bytes(make_clip(12, w=40, h=24, rate=4, pattern=True))
    _, ids, _, hf_logits = _reference(smv, clip.read_bytes())
    eos = set(json.loads((smv["ck"] / "config.json").read_text())["tokens"]["eos"])
    want = greedy_ids(hf_logits, ids, eos)
    export_onnx(str(smv["ck"]), smv["dir"] / "onnx-v", precision="fp32", log=None)
    got = record_answers(monkeypatch)
    runs = (["--model", str(smv["ck"]), "--backend", "torch"], ["--bundle", str(smv["dir"] / "onnx-v")])
    for args in runs:
        r = CliRunner().invoke(main, ["run", *args, "--video", str(clip), "--max-new-tokens", "4", QUESTION])
        assert r.exit_code == 0, r.output
    assert got == [want] * len(runs) and want, (got, want)
