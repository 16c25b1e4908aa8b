"""InternLM-XComposer2 (Partial-LoRA) against a re-computation from the released code's equations.

The tiny checkpoint is written in the release's layout (internlm/internlm-xcomposer2-7b: `model.layers.i.attention.wqkv`
with `Plora_A` / `Plora_B`, `feed_forward.w1/w2/w3`, `attention_norm`, `ffn_norm`, `model.tok_embeddings`, `output`,
`vit.vision_tower.*` (transformers' CLIPVisionModel), `vision_proj.0/2`; config.json's keys; InternLM2's special tokens
`<s>`, `</s>`, `[UNUSED_TOKEN_146]` (im_start) and `[UNUSED_TOKEN_145]` (im_end)). The reference below is written from
modeling_internlm2.py's PLoRA (W0 x + Plora_B(Plora_A(x)) * lora_alpha / lora_r on im_mask rows), InternLM2Attention
(wqkv rearranged 'b q (h gs d) -> b q h gs d', repeat_kv, rotate_half RoPE), InternLM2MLP and
modeling_internlm_xcomposer2.py's interleav_wrap_chat; it shares no code with edgemm.
"""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .test_import_llava import away_from_init, bundles_answer, exports_validate

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")

D, H, K, L, FF, V = 64, 4, 2, 2, 128, 96
E, G = D // H, H // K
R, ALPHA = 8, 16                            # PLoRA's default lora_r, lora_alpha (lora_scaling 2)
THETA, EPS = 10000.0, 1e-5
S, PATCH, VW = 16, 4, 128                   # CLIP: 16 px, 4 x 4 patches, two 64-wide heads
BOS, EOS, IM_END, IM_START = 1, 2, 94, 95
WORDS = ["system", "user", "assistant", "what", "color", "is", "the", "circle", "?", "red", "blue", "three"]
ASK = "what color is the circle ?"
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
VIT = "vit.vision_tower.vision_model."
PROJS = ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")


# --------------------------------------------------------------------------- the release's layout
def _clip():
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=VW, intermediate_size=2 * VW, num_hidden_layers=2, num_attention_heads=2,
                           image_size=S, patch_size=PATCH, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return away_from_init(CLIPVisionModel(cfg).eval())


def _tensors(seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])
    # the release's names (saved with transformers 4: CLIPVisionModel.vision_model.*)
    t = {VIT + k: v.detach().clone() for k, v in _clip().state_dict().items()}
    t.update({"vision_proj.0.weight": w(D, VW), "vision_proj.0.bias": w(D) * 0.3,
              "vision_proj.2.weight": w(D, D), "vision_proj.2.bias": w(D) * 0.3,
              "model.tok_embeddings.weight": w(V, D) * 4, "model.norm.weight": 1 + 0.2 * w(D),
              "output.weight": w(V, D)})
    for i in range(L):
        s = f"model.layers.{i}."
        t[s + "attention_norm.weight"], t[s + "ffn_norm.weight"] = 1 + 0.2 * w(D), 1 + 0.2 * w(D)
        for p, (n_in, n_out) in zip(PROJS, ((D, (H + 2 * K) * E), (D, D), (D, FF), (D, FF), (FF, D))):
            t[s + p + ".weight"] = w(n_out, n_in)
            t[s + p + ".Plora_A.weight"] = w(R, n_in)
            t[s + p + ".Plora_B.weight"] = w(n_out, R)             # trained: not the zero init
    return t


def _tokenizer(d):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{x: i + 3 for i, x in enumerate(WORDS)},
             "[UNUSED_TOKEN_145]": IM_END, "[UNUSED_TOKEN_146]": IM_START}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])  # add_bos
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>",
                                                         "unk_token": "<unk>", "add_bos_token": True}))
    return tok


def write_release(d, tensors):
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["InternLMXComposer2ForCausalLM"], "model_type": "internlm2",      # as released
           "auto_map": {"AutoModel": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM"},
           "hidden_size": D, "num_attention_heads": H, "num_key_value_heads": K, "num_hidden_layers": L,
           "intermediate_size": FF, "vocab_size": V, "hidden_act": "silu", "rms_norm_eps": EPS, "rope_theta": THETA,
           "rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 512, "bias": False,
           "img_size": S, "max_length": 512, "tie_word_embeddings": False, "bos_token_id": BOS, "eos_token_id": EOS,
           "pad_token_id": EOS}
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "model.safetensors"), {"format": "pt"})
    return _tokenizer(d)


# --------------------------------------------------------------------------- the released equations
def plora(t, p, x, im_mask):
    """PLoRA.forward: res = W0 x; res[im_mask] += Plora_B(Plora_A(x[im_mask])) * lora_scaling."""
    res = x @ t[p + ".weight"].T
    lora = x @ t[p + ".Plora_A.weight"].T @ t[p + ".Plora_B.weight"].T * (ALPHA / R)
    return res + torch.where(im_mask[:, None], lora, torch.zeros(()))


def rms(x, w):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS))


def rotate_half(x):
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)


def released_logits(t, x, im_mask):
    """InternLMXComposer2ForCausalLM's forward on inputs_embeds x [T, D] with im_mask [T] -> logits [T, V]."""
    T = x.shape[0]
    inv = 1.0 / THETA ** (torch.arange(0, E, 2).float() / E)
    freqs = torch.einsum("i,j->ij", torch.arange(T).float(), inv)
    cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()
    causal = torch.full((T, T), float("-inf")).triu(1)
    for i in range(L):
        s = f"model.layers.{i}."
        h = rms(x, t[s + "attention_norm.weight"])
        qkv = plora(t, s + "attention.wqkv", h, im_mask).view(T, K, G + 2, E)     # 'b q (h gs d) -> b q h gs d'
        q = qkv[:, :, :G].reshape(T, H, E).transpose(0, 1)                      # 'b q h gs d -> b q (h gs) d'
        k, v = qkv[:, :, -2].transpose(0, 1), qkv[:, :, -1].transpose(0, 1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k = k[:, None].expand(K, G, T, E).reshape(H, T, E)                       # repeat_kv
        v = v[:, None].expand(K, G, T, E).reshape(H, T, E)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(E) + causal, -1) @ v
        x = x + plora(t, s + "attention.wo", a.transpose(0, 1).reshape(T, D), im_mask)
        h = rms(x, t[s + "ffn_norm.weight"])
        up = F.silu(plora(t, s + "feed_forward.w1", h, im_mask)) * plora(t, s + "feed_forward.w3", h, im_mask)
        x = x + plora(t, s + "feed_forward.w2", up, im_mask)
    return rms(x, t["model.norm.weight"]) @ t["output.weight"].T


def released_image_rows(t, pixels):
    """build_mlp.py: the CLIP tower's last hidden states, CLS dropped, through vision_proj (Linear, GELU, Linear)."""
    clip = _clip()
    clip.load_state_dict({k[len(VIT):]: v for k, v in t.items() if k.startswith(VIT)}, strict=False)
    feats = clip(pixel_values=pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
    h = F.gelu(feats @ t["vision_proj.0.weight"].T + t["vision_proj.0.bias"])
    return (h @ t["vision_proj.2.weight"].T + t["vision_proj.2.bias"])[0]


def chat_parts(tok, query_after_image: str):
    """interleav_wrap_chat: the prompt with the default meta_instruction, split at <ImageHere>, each part tokenized
    as tokenizer(part) does (<s> prepended) -> (ids before the image, ids after)."""
    from edgemm.families.xcomposer2 import META
    prompt = (f"[UNUSED_TOKEN_146]system\n{META}[UNUSED_TOKEN_145]\n"
              f"[UNUSED_TOKEN_146]user\n<ImageHere>{query_after_image}[UNUSED_TOKEN_145]\n"
              "[UNUSED_TOKEN_146]assistant\n")
    before, after = prompt.split("<ImageHere>")
    return tok.encode(before).ids, tok.encode(after).ids


def _pixels(img: np.ndarray) -> torch.Tensor:
    x = (img.astype(np.float32) / 255.0 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return torch.from_numpy(x.transpose(2, 0, 1)[None].copy())


def _image(seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (S, S, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from edgemm.importers import import_checkpoint
    d = tmp_path_factory.mktemp("xcomposer2")
    t = _tensors()
    tok = write_release(d / "internlm-xcomposer2-tiny", t)
    summary = import_checkpoint(d / "internlm-xcomposer2-tiny", d / "ck", log=None)
    return {"dir": d, "ck": d / "ck", "t": t, "tok": tok, "summary": summary}


# --------------------------------------------------------------------------- tests
def test_import_reads_the_released_layout(imported):
    """Config, special tokens and the stored chat template: the prompt edgemm renders for an image question is the
    ids interleav_wrap_chat feeds (its <s> before each text part included), image rows in place of <ImageHere>."""
    from edgemm.checkpoint import load_checkpoint
    from edgemm.families.xcomposer2 import TEMPLATE
    from edgemm.serve.prompt import build_segments
    from edgemm.tokenizer import Tokenizer
    ck, tok = imported["ck"], imported["tok"]
    assert imported["summary"]["family"] == "xcomposer2"
    assert imported["summary"]["variants"] == [
        "grouped-query attention", "low-rank delta vision branches (partial-lora)", "clip vision tower",
        "mlp projector"]
    m, _ = load_checkpoint(ck)
    c = m.cfg
    assert (c.decoder.vision_delta_rank, c.decoder.kv_heads, c.n_image_rows, c.vision.layers) == (R, K, 16, 2)
    assert c.tokens.bos == BOS and c.tokens.add_bos and set(c.tokens.eos) == {EOS, IM_END}
    template = (ck / "chat_template.jinja").read_text()
    assert template == TEMPLATE
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,x"}},
                                         {"type": "text", "text": ASK}]}]
    segs, urls = build_segments(Tokenizer.load(ck / "tokenizer.json"), template, msgs)
    before, after = chat_parts(tok, ASK)
    assert [(k, d if k == "text" else None) for k, d in segs] == [("text", before), ("image", None), ("text", after)]
    assert after[0] == BOS and before[:2] == [BOS, IM_START] and after[-3:] == [IM_END, IM_START, 5]


def test_partial_lora_layer_and_merged_weights(imported):
    """Each projection of an imported layer: text rows see W0, image rows W0 + B A * lora_scaling (its merged
    weight), in edgemm's Q, K, V order; on random rows, routing text rows through the text branch and image rows
    through the vision branch gives PLoRA.forward with im_mask."""
    from edgemm.blocks.ops import routed
    from edgemm.checkpoint import load_checkpoint
    t = imported["t"]
    m, _ = load_checkpoint(imported["ck"])

    def ours(w):                    # InternLM2's wqkv rows [K, (q_0 .. q_{G-1}, k, v), E] -> [Q heads | K | V]
        w = w.view(K, G + 2, E, -1)
        return torch.cat([w[:, :G].reshape(H * E, -1), w[:, G].reshape(K * E, -1), w[:, G + 1].reshape(K * E, -1)])
    mask = torch.tensor([False, True, True, False, True, False, False])
    for i, layer in enumerate(m.decoder.layers):
        for n, p in zip(("qkv", "o", "gate", "up", "down"), PROJS):
            s = f"model.layers.{i}.{p}"
            w0, delta = t[s + ".weight"], t[s + ".Plora_B.weight"] @ t[s + ".Plora_A.weight"] * (ALPHA / R)
            fix = ours if n == "qkv" else (lambda w: w)
            text, vis = getattr(layer.text, n), getattr(layer.vision, n)
            torch.testing.assert_close(text.weight, fix(w0), rtol=0, atol=1e-6)
            torch.testing.assert_close(vis.merged(), fix(w0 + delta), rtol=0, atol=1e-5)
            assert vis.base is text                                  # W0 is the text branch's, stored once
            xi = torch.randn(1, 7, w0.shape[1])
            want = plora(t, s, xi[0], mask) @ fix(torch.eye(w0.shape[0])).T       # in edgemm's row order
            torch.testing.assert_close(routed(xi, mask, text, vis)[0], want, rtol=0, atol=1e-5)
    assert not any(".vision." in k and k.endswith(("qkv.weight", "o.weight", "gate.weight", "up.weight",
                                                   "down.weight")) for k in m.state_dict())


def test_whole_model_logits_match_the_released_equations(imported):
    """Image rows (CLIP + vision_proj) and the logits of every row of a prompt (text with <s>, the image, text with
    <s>) through edgemm's segments with a KV cache, then cached greedy steps, equal the released forward on
    inputs_embeds with im_mask (1e-4)."""
    from edgemm.checkpoint import load_checkpoint
    from edgemm.model import KVCache
    t, tok = imported["t"], imported["tok"]
    m, _ = load_checkpoint(imported["ck"])
    px = _pixels(_image())
    before, after = chat_parts(tok, ASK)
    with torch.no_grad():
        want_rows = released_image_rows(t, px)
        rows = m.encode_image(px)
        torch.testing.assert_close(rows[0], want_rows, rtol=0, atol=1e-4)
        emb = t["model.tok_embeddings.weight"]
        ids = list(after)
        cache = KVCache.empty(m.cfg.decoder, 1, 512)
        got = []
        lg, pos = m.forward_segment("text", torch.tensor([before]), cache, 0, last_only=False)
        got.append(lg[0])
        lg, pos = m.forward_segment("image", rows, cache, pos, last_only=False)
        got.append(lg[0])
        lg, pos = m.forward_segment("text", torch.tensor([after]), cache, pos, last_only=False)
        got.append(lg[0])
        for _ in range(3):                                              # cached decode steps (text rows)
            ids.append(int(got[-1][-1].argmax()))
            lg, pos = m.forward_segment("text", torch.tensor([ids[-1:]]), cache, pos, last_only=False)
            got.append(lg[0])
        x = torch.cat([emb[before], want_rows, emb[ids]])
        im_mask = torch.tensor([False] * len(before) + [True] * len(want_rows) + [False] * len(ids))
        want = released_logits(t, x, im_mask)
    torch.testing.assert_close(torch.cat(got), want, rtol=0, atol=1e-4)
    # the delta matters: without it (im_mask all False) the image rows' logits differ well beyond the tolerance
    assert (released_logits(t, x, torch.zeros_like(im_mask)) - want).abs().max() > 1e-2


def test_exports_validate_and_answer(imported, monkeypatch):
    """onnx fp32 and int8 (per-modality calibration: the image graph's W0 MatMuls get their activation scale from
    image rows) and trt fp16 (--no-build) validate against the reference; gguf is refused naming the Partial-LoRA
    branch and the targets that can; `edgemm run --image` on the onnx bundle and the trt one (its graphs on the CPU)
    answers with the greedy ids of the released equations."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    import onnx
    from onnx import numpy_helper
    from PIL import Image
    d, ck, t, tok = imported["dir"], imported["ck"], imported["t"], imported["tok"]
    exports_validate(ck, d, "low-rank delta vision branches (partial-lora)")

    def act_scale(stage, matmul):      # the activation scale of the Q/DQ pair feeding a MatMul of the int8 bundle
        g = onnx.load(str(d / "onnx-int8" / f"{stage}.onnx"), load_external_data=False).graph
        inits = {i.name: i for i in g.initializer}
        prod = {o: n for n in g.node for o in n.output}
        node = next(n for n in g.node if n.op_type == "MatMul" and n.name.startswith(matmul))
        dq = prod[node.input[0]]
        assert dq.op_type == "DequantizeLinear", dq.op_type
        return float(numpy_helper.to_array(inits[dq.input[1]]))
    text_scale = act_scale("decoder_text", "layers.0.text.qkv")
    image_scale = act_scale("decoder_image", "layers.0.vision.qkv.base")
    assert text_scale != pytest.approx(image_scale, rel=1e-3)          # one W0, two calibrations
    Image.fromarray(_image(1)).save(d / "img.png")
    before, after = chat_parts(tok, ASK)
    eos = {EOS, IM_END}
    with torch.no_grad():
        rows = released_image_rows(t, _pixels(_image(1)))
        emb, ids, want = t["model.tok_embeddings.weight"], list(after), []
        for _ in range(4):
            x = torch.cat([emb[before], rows, emb[ids]])
            mask = torch.tensor([False] * len(before) + [True] * len(rows) + [False] * len(ids))
            nxt = int(released_logits(t, x, mask)[-1].argmax())
            if nxt in eos:
                break
            want.append(nxt)
            ids.append(nxt)
    bundles_answer(monkeypatch, d, d / "img.png", ASK, want)


def test_refusals(tmp_path):
    """Layouts edgemm does not import are refused in one line: 4KHD's newline rows, mixed Partial-LoRA ranks, an
    img_size the position table does not fit, RoPE scaling other than InternLM2's dynamic NTK."""
    from edgemm.errors import EdgemmError
    from edgemm.importers import import_checkpoint
    t = _tensors()
    write_release(tmp_path / "hd", {**t, "plora_glb_GN": torch.zeros(1, 1, D), "plora_sub_GN": torch.zeros(1, 1, 1, D)})
    with pytest.raises(EdgemmError, match="4KHD"):
        import_checkpoint(tmp_path / "hd", tmp_path / "o1", log=None)
    s = "model.layers.0.attention.wqkv."
    t2 = {**t, s + "Plora_A.weight": torch.randn(4, D), s + "Plora_B.weight": torch.randn((H + 2 * K) * E, 4)}
    write_release(tmp_path / "mixed", t2)
    with pytest.raises(EdgemmError, match="ranks"):
        import_checkpoint(tmp_path / "mixed", tmp_path / "o2", log=None)
    for key, bad, says in (("img_size", 20, "img_size"), ("img_size", "16", "img_size"),
                           ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling"),
                           ("rope_scaling", "dynamic", "rope_scaling")):
        cfg = json.loads((tmp_path / "hd" / "config.json").read_text())
        write_release(tmp_path / key, t)
        (tmp_path / key / "config.json").write_text(json.dumps({**cfg, key: bad}))
        with pytest.raises(EdgemmError, match=says):
            import_checkpoint(tmp_path / key, tmp_path / "o3", log=None)
