"""LLaMA-VID (edgemm.families.llamavid, edgemm.blocks.llamavid): a tiny checkpoint written here in the released layout
(dvlab-research/LLaMA-VID: LlavaLlamaAttForCausalLM's flat config.json and model.* tensors, LAVIS's eva_vit_g.pth
beside it as a torch.save pickle, the Q-Former's BERT tokenizer in qformer_tokenizer/), imported and checked against
an independent computation: transformers' InstructBlipVideo vision model and Q-Former (LAVIS's EVA ViT-g and BERT
Q-Former, run per frame as InstructBlipVideoModel.get_video_features batches a clip's frames with the question
repeated), LLaMA-VID's own steps (vlm_att_ln, the key projector, the queries' averaged attention, the value
projector, the pooled content, mm_projector) re-computed here from llamavid_arch.py's token_generation, and
transformers' LlamaForCausalLM for the decoder; then `edgemm run --video` on a clip made here, on the torch backend,
an onnx bundle, a trt bundle's Q/DQ graphs (on the CPU) and a gguf bundle (llama.cpp, the vision stage in ONNX)."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgemm.errors import EdgemmError

from .test_import_llava import away_from_init, greedy_ids, record_answers

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")

W, Q, QW, D = 176, 4, 64, 32            # EVA width (2 heads of 88, as the release's width // 88), queries, Q-Former, LM
QWORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + \
    "what is in the video describe colour of shape how many are there a red blue happens".split()
TOWER = "./model_zoo/LAVIS/eva_vit_g.pth"


def _tiny(seed: int = 0, grid: int = 1) -> dict:
    """transformers' InstructBlipVideo vision model and Q-Former, a Llama, and LLaMA-VID's own tensors, all away from
    their init (the EVA tower's k bias zero: LAVIS has q_bias and v_bias only)."""
    from transformers import (InstructBlipVideoQFormerConfig, InstructBlipVideoQFormerModel,
                              InstructBlipVideoVisionConfig, InstructBlipVideoVisionModel, LlamaConfig, LlamaForCausalLM)
    torch.manual_seed(seed)
    vis = InstructBlipVideoVisionModel(InstructBlipVideoVisionConfig(
        hidden_size=W, intermediate_size=64, num_hidden_layers=2, num_attention_heads=W // 88, image_size=16,
        patch_size=4, layer_norm_eps=1e-6)).eval()
    qf = InstructBlipVideoQFormerModel(InstructBlipVideoQFormerConfig(
        vocab_size=len(QWORDS) + 1, hidden_size=QW, num_hidden_layers=3, num_attention_heads=QW // 64,
        intermediate_size=96, cross_attention_frequency=2, max_position_embeddings=64, encoder_hidden_size=W)).eval()
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=D, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False)).eval()
    for m in (vis, qf, lm):
        away_from_init(m, seed)
    with torch.no_grad():
        for layer in vis.encoder.layers:
            layer.self_attn.qkv.bias[W:2 * W] = 0
    g = torch.Generator().manual_seed(seed + 7)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2                                          # noqa: E731
    p = {"vlm_att_query": r(1, Q, QW), "vlm_att_ln.weight": 1 + r(W), "vlm_att_ln.bias": r(W)}
    for name, (o, i) in (("vlm_att_projector", (W, QW)), ("vlm_att_key_projector", (W, W)),
                         ("vlm_att_val_projector", (D, W)), ("mm_projector.0", (D, W)), ("mm_projector.2", (D, D))):
        p[name + ".weight"], p[name + ".bias"] = r(o, i), r(o)
    return {"vision": vis, "qformer": qf, "lm": lm, "p": p, "grid": grid}


def reference_tokens(ref: dict, px: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """One prompt's tokens for F frames [F, 3, S, S] -> [1, F * (1 + K), D], as llamavid_arch.py's vlm_attention
    (image_counts [F], bert_type qformer_pretrain, mm_vision_select_feature patch) and token_generation compute them."""
    p, n = ref["p"], px.shape[0]
    with torch.no_grad():
        feats = ref["vision"](pixel_values=px, output_hidden_states=True).hidden_states[-1]   # EVA: no final norm
        ids = ids.expand(n, -1)                                  # input_ids[:, None].expand(-1, F, -1).flatten(0, 1)
        bert_in = F.layer_norm(feats, (W,), p["vlm_att_ln.weight"], p["vlm_att_ln.bias"])    # vlm_att_ln (eps 1e-5)
        img = feats[:, 1:] if feats.shape[1] % 2 == 1 else feats                  # 'patch': the CLS row removed
        query = p["vlm_att_query"].expand(n, -1, -1)
        out = ref["qformer"](input_ids=ids, attention_mask=torch.ones(n, Q + ids.shape[1], dtype=torch.long),
                             query_embeds=query, encoder_hidden_states=bert_in,
                             encoder_attention_mask=torch.ones(feats.shape[:2], dtype=torch.long)).last_hidden_state
        lin = lambda x, k: F.linear(x, p[k + ".weight"], p[k + ".bias"])       # noqa: E731
        text_q = lin(out[:, :Q], "vlm_att_projector")
        ctx = text_q @ lin(img, "vlm_att_key_projector").transpose(-1, -2) / img.shape[-1] ** 0.5
        ctx = lin((ctx.softmax(-1) @ img).mean(1)[:, None], "vlm_att_val_projector")
        if ref["grid"] == 1:                                     # compress_type 'mean'
            vis_embed = img.mean(dim=1, keepdim=True)
        else:                                                    # 'grid:g'
            s = int(img.shape[1] ** 0.5)
            k = s // ref["grid"]
            v = F.avg_pool2d(img.reshape(n, s, s, -1).permute(0, 3, 1, 2), padding=0, kernel_size=k, stride=k)
            vis_embed = v.permute(0, 2, 3, 1).flatten(1, 2)
        vis_embed = lin(F.gelu(lin(vis_embed, "mm_projector.0")), "mm_projector.2")
        return torch.cat([ctx, vis_embed], 1).flatten(0, 1)[None]


def _lavis_tower(vis) -> dict:
    """transformers' BLIP-2-style vision model -> LAVIS's eva_vit_g.pth names (the release's EVAVisionTowerLavis)."""
    out = {"cls_token": vis.embeddings.class_embedding, "pos_embed": vis.embeddings.position_embedding}
    for n in ("weight", "bias"):
        out[f"patch_embed.proj.{n}"] = getattr(vis.embeddings.patch_embedding, n)
    w = vis.config.hidden_size
    for i, layer in enumerate(vis.encoder.layers):
        s, b = f"blocks.{i}.", layer.self_attn.qkv.bias
        out.update({s + "attn.qkv.weight": layer.self_attn.qkv.weight, s + "attn.q_bias": b[:w],
                    s + "attn.v_bias": b[2 * w:]})
        for n in ("weight", "bias"):
            for ours, mod in (("norm1", layer.layer_norm1), ("attn.proj", layer.self_attn.projection),
                              ("norm2", layer.layer_norm2), ("mlp.fc1", layer.mlp.fc1), ("mlp.fc2", layer.mlp.fc2)):
                out[s + f"{ours}.{n}"] = getattr(mod, n)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def _lavis_qformer(qf) -> dict:
    """transformers' Q-Former names -> LAVIS's (vlm_att_encoder.bert: attention.self.*, embeddings.LayerNorm)."""
    out = {}
    for k, v in qf.state_dict().items():
        if "position_ids" in k:
            continue
        k = k.replace("attention.attention.", "attention.self.").replace("embeddings.layernorm.", "embeddings.LayerNorm.")
        out["model.vlm_att_encoder.bert." + k] = v.detach().clone().contiguous()
    return out


def write_release(ref: dict, d, in_checkpoint: bool = False):
    """The checkpoint as the released code saves it (model.* + lm_head, the vlm_att_* modules, mm_projector), the
    EVA tower in LAVIS's eva_vit_g.pth at mm_vision_tower's path (or in the checkpoint), its tokenizers."""
    from safetensors.torch import save_file
    from transformers import BertTokenizer
    lm, tc = ref["lm"], ref["lm"].config
    sd = {k: v.detach().clone().contiguous() for k, v in lm.state_dict().items()}
    sd.update(_lavis_qformer(ref["qformer"]))
    sd.update({"model." + k: v.contiguous() for k, v in ref["p"].items()})
    d.mkdir(parents=True)
    tower = _lavis_tower(ref["vision"])
    if in_checkpoint:
        sd.update({"model.vision_tower.vision_tower." + k: v for k, v in tower.items()})
    else:
        (d / TOWER).parent.mkdir(parents=True)
        torch.save(tower, d / TOWER)
    save_file(sd, str(d / "model.safetensors"))
    cfg = {"architectures": ["LlavaLlamaAttForCausalLM"], "model_type": "llava", "hidden_act": "silu",
           "vocab_size": tc.vocab_size, "hidden_size": tc.hidden_size, "intermediate_size": tc.intermediate_size,
           "num_hidden_layers": tc.num_hidden_layers, "num_attention_heads": tc.num_attention_heads,
           "num_key_value_heads": tc.num_key_value_heads, "max_position_embeddings": tc.max_position_embeddings,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "mm_vision_tower": TOWER,
           "image_processor": "./llamavid/processor/clip", "mm_hidden_size": ref["vision"].config.hidden_size,
           "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
           "mm_vision_select_feature": "patch", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
           "image_aspect_ratio": "pad", "bert_type": "qformer_pretrain", "num_query": ref["p"]["vlm_att_query"].shape[1],
           "compress_type": "mean" if ref["grid"] == 1 else f"grid:{ref['grid']}", "max_token": 2048}
    (d / "config.json").write_text(json.dumps(cfg))
    from edgemm import shapes
    from edgemm.tokenizer import train_tokenizer
    train_tokenizer(shapes.corpus_lines(), 512).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))
    BertTokenizer(vocab={w: i for i, w in enumerate(QWORDS)}).save_pretrained(d / "qformer_tokenizer")
    return d


def qformer_ids(d, question: str, max_length: int = 256) -> torch.Tensor:
    """The question's ids as vlm_attention tokenizes it (BertTokenizer, truncation_side left, max_length 256)."""
    from transformers import BertTokenizer
    tok = BertTokenizer.from_pretrained(d / "qformer_tokenizer", truncation_side="left")
    return tok([question], padding="longest", truncation=True, max_length=max_length, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def vid(tmp_path_factory):
    from edgemm.importers import import_checkpoint
    d = tmp_path_factory.mktemp("llamavid")
    ref = _tiny()
    src = write_release(ref, d / "src")
    with pytest.raises(EdgemmError, match="eva_vit_g.pth is a pickle.*--allow-bin"):
        import_checkpoint(src, d / "refused", log=None)
    summary = import_checkpoint(src, d / "ck", log=None, allow_bin=True)
    return {"ref": ref, "src": src, "ck": d / "ck", "summary": summary, "dir": d}


@pytest.mark.parametrize("grid", [1, 2])
def test_frame_tokens_match_the_released_equations(grid, tmp_path):
    """Each frame's context token and content rows for a question: edgemm's vision stage (the tower and the llamavid
    connector) against the re-computation, for a 3-frame clip; compress 'mean' and 'grid:2'; the tower in the
    checkpoint (model.vision_tower.vision_tower.*) as well as in eva_vit_g.pth; the question reaches the tokens."""
    from edgemm.checkpoint import load_checkpoint
    from edgemm.importers import import_checkpoint
    ref = _tiny(seed=grid, grid=grid)
    src = write_release(ref, tmp_path / "src", in_checkpoint=grid == 2)
    summary = import_checkpoint(src, tmp_path / "ck", log=None, allow_bin=grid == 1)
    assert summary["family"] == "llamavid"
    m, _ = load_checkpoint(tmp_path / "ck")
    assert m.cfg.n_image_rows == 1 + grid * grid and m.cfg.vision.heads == 2 and m.cfg.adapter.qformer_heads == 1
    px = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(grid))
    outs = []
    for q in ("what happens in the video", "how many red shape are there"):
        ids = qformer_ids(src, q)
        want = reference_tokens(ref, px, ids)
        with torch.no_grad():
            got = m.encode_image(px, ids.expand(3, -1), torch.ones(3, ids.shape[1], dtype=torch.long))
        assert got.shape == (3, 1 + grid * grid, D)
        assert (got.reshape(1, -1, D) - want).abs().max().item() <= 1e-4
        outs.append(got)
    assert (outs[0][:, 0] - outs[1][:, 0]).abs().max() > 1e-3          # the context token reads the question
    assert (outs[0][:, 1:] - outs[1][:, 1:]).abs().max() == 0          # the content rows do not


def test_import_and_logits_of_a_clip_match(vid):
    """The whole model on a 3-frame clip between text: edgemm's full forward and cached steps against transformers'
    Llama fed the reference's frame tokens; the importer's settings (1 frame a second, the template, the BERT
    tokenizer cutting a long question on the left)."""
    from edgemm.checkpoint import load_checkpoint
    from .test_import_llava import logits_and_cached_steps_match
    from edgemm.info import checkpoint_param_counts, param_counts
    m, tok = load_checkpoint(vid["ck"])
    assert vid["summary"]["family"] == "llamavid" and m.cfg.vision.video == {"fps": 1, "sample": "step", "question": True}
    assert param_counts(m.cfg) == checkpoint_param_counts(vid["ck"]) == m.param_counts()      # the specs' count
    assert m.cfg.reads_question and m.cfg.vision.image_mean == (0.48145466, 0.4578275, 0.40821073)
    long_q = " ".join(["red"] * 300 + ["blue"])
    ids, _ = tok.qformer(long_q)
    # the release cuts on the left at 256 ids; this tiny Q-Former has 64 positions (past them the release would fail)
    assert ids.shape[1] == 64 and ids[0, -2] == QWORDS.index("blue")
    assert (ids == qformer_ids(vid["src"], long_q, 64).numpy()).all()
    px = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    qids = qformer_ids(vid["src"], "describe the video")
    rows = reference_tokens(vid["ref"], px, qids)
    with torch.no_grad():
        got = m.encode_image(px, qids.expand(3, -1)).reshape(1, -1, D)
    assert (got - rows).abs().max().item() <= 1e-4
    g = torch.Generator().manual_seed(4)
    pre, post = torch.randint(5, 500, (1, 5), generator=g), torch.randint(5, 500, (1, 6), generator=g)
    lm = vid["ref"]["lm"]
    emb = lm.get_input_embeddings()

    def hf_logits(ids):
        x = torch.cat([emb(pre), rows, emb(torch.tensor([ids[pre.shape[1] + rows.shape[1]:]]))], 1)
        return lm(inputs_embeds=x).logits[0]
    full = pre[0].tolist() + [0] * rows.shape[1] + post[0].tolist()
    logits_and_cached_steps_match(m, [("text", pre), ("image", got), ("text", post)], full, hf_logits)


def test_one_frame_a_second():
    """The release's load_video: every round(fps)-th frame from the first (a 4 fps clip of 10 frames: 0, 4, 8)."""
    pytest.importorskip("av", reason="video input needs PyAV")
    from edgemm.video import read_video, sample_indices
    from .test_video import make_clip
    stats = {}
    read_video(make_clip(10, rate=4), None, fps=1, sampling="step", stats=stats)
    assert stats["indices"] == [0, 4, 8] and stats["decoded"] == 9
    assert sample_indices(100, None, 1, 29.97, sampling="step") == list(range(0, 100, 30))


def _reference_answer(vid, clip, question: str, n: int = 4) -> list:
    """The released pipeline's greedy ids: the clip's frames at 1 fps (edgemm.video's decoding; its processor's
    resize and crop are checked in test_video), the reference's tokens for the question, the conv_llava_v1 prompt
    with the clip's rows where <image> stands, transformers' Llama."""
    from transformers import PreTrainedTokenizerFast
    from edgemm.config import ModelConfig
    from edgemm.video import frame_pixels, read_video
    cfg = ModelConfig.load(vid["ck"] / "config.json")
    px = torch.from_numpy(frame_pixels(read_video(clip, None, fps=1, sampling="step"), cfg))
    rows = reference_tokens(vid["ref"], px, qformer_ids(vid["src"], question))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(vid["src"] / "tokenizer.json"))
    system = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
              "detailed, and polite answers to the human's questions.")
    a = tok(f"{system} USER: ", add_special_tokens=False).input_ids
    z = tok(f"\n{question} ASSISTANT:", add_special_tokens=False).input_ids
    lm = vid["ref"]["lm"]
    emb = lm.get_input_embeddings()
    bos = [tok.convert_tokens_to_ids("<s>")] if cfg.tokens.add_bos else []
    head = bos + a

    def hf_logits(ids):
        x = torch.cat([emb(torch.tensor([head])), rows, emb(torch.tensor([ids[len(head) + rows.shape[1]:]]))], 1)
        return lm(inputs_embeds=x).logits[0]
    return greedy_ids(hf_logits, head + [0] * rows.shape[1] + z, [tok.convert_tokens_to_ids("</s>")], n)


def test_edgemm_run_video_on_torch_and_an_onnx_bundle(vid, monkeypatch):
    """`edgemm run --video` answers as the reference does, on the torch backend (the checkpoint) and on an onnx
    bundle (its vision stage takes the frames with the question's Q-Former ids; the export validates); a clip too
    long for the context is refused in one line before a frame is encoded."""
    pytest.importorskip("av", reason="video input needs PyAV")
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    from click.testing import CliRunner
    from edgemm.cli import main
    from edgemm.export.onnx import export_onnx
    from edgemm.export.trt import export_trt
    from .test_video import make_clip
    d = vid["dir"]
    clip = d / "clip.mp4"
    clip.write_bytes(make_clip(10, rate=4, pattern=True))          # frames 0, 4, 8
    q = "what happens in the video"
    want = _reference_answer(vid, clip.read_bytes(), q)
    man = export_onnx(str(vid["ck"]), d / "onnx", precision="fp32", log=None)
    assert all(s["ok"] for s in man["validation"]["stages"].values()), man["validation"]
    assert [i["name"] for i in man["stages"]["vision"]["inputs"]] == ["pixels", "qformer_input_ids",
                                                                       "qformer_attention_mask"]
    assert man["instruction"]["truncation_side"] == "left"
    man = export_trt(str(vid["ck"]), d / "trt", precision="fp16", no_build=True, log=None)
    assert all(s["ok"] for s in man["validation"]["stages"].values()), man["validation"]
    assert man["trt"]["profiles"]["orin"]["vision"]["pixels"]["max"][0] >= 8      # a call's frames
    runs = (["--model", str(vid["ck"]), "--backend", "torch"], ["--bundle", str(d / "onnx")],
            ["--bundle", str(d / "trt"), "--backend", "trt", "--device", "cpu"])       # (trt: its Q/DQ graphs)
    if importlib.util.find_spec("llama_cpp") is not None:      # llama.cpp's decoder, the vision stage in ONNX beside it
        from edgemm.export.gguf import export_gguf
        man = export_gguf(model=str(vid["ck"]), out=d / "gguf", precision="f32", log=None, threads=2)
        assert man["stages"]["vision"]["format"] == "onnx" and man["qformer_tokenizer"] in man["files"]
        runs += (["--bundle", str(d / "gguf"), "--threads", "2"],)
    got = record_answers(monkeypatch)
    for args in runs:
        r = CliRunner().invoke(main, ["run", *args, "--video", str(clip), "--max-new-tokens", "4", q])
        assert r.exit_code == 0, r.output
    assert got == [want] * len(runs) and want, (got, want)
    long = d / "long.mp4"
    long.write_bytes(make_clip(200, rate=1))
    r = CliRunner().invoke(main, ["run", "--model", str(vid["ck"]), "--backend", "torch", "--video", str(long), q])
    assert r.exit_code == 2 and "context holds" in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_serve_video_url(vid):
    """The server's video_url part: the clip encoded with its message's question, answered as the reference does."""
    pytest.importorskip("av", reason="video input needs PyAV")
    pytest.importorskip("fastapi", reason="needs the serve extra")
    pytest.importorskip("openai", reason="needs the test extra (openai)")
    import base64
    from transformers import PreTrainedTokenizerFast
    from .test_serve import Server
    from .test_video import make_clip
    clip, q = make_clip(10, rate=4, pattern=True), "describe the colour of the shape"
    want = _reference_answer(vid, clip, q)
    text = PreTrainedTokenizerFast(tokenizer_file=str(vid["src"] / "tokenizer.json")).decode(want).strip()
    s = Server("--model", str(vid["ck"]), "--backend", "torch", "--max-tokens", "16")
    try:
        msg = [{"role": "user", "content": [{"type": "video_url", "video_url": {
            "url": "data:video/mp4;base64," + base64.b64encode(clip).decode()}}, {"type": "text", "text": q}]}]
        r = s.client().chat.completions.create(model="ck", messages=msg, max_tokens=4, temperature=0)
        assert r.choices[0].message.content.strip() == text and text, (r.choices[0].message.content, text)
    finally:
        print(s.log()[-2000:])
        s.stop()
