"""InternLM-XComposer2 -> edgemm: CLIP ViT-L tower, the vision_proj MLP, and InternLM2 with Partial-LoRA, imported as
a routed decoder whose vision branch is the text branch plus a low-rank delta (layer kind "low-rank-delta").

The released layout (internlm/internlm-xcomposer2-7b, -vl-7b: modeling_internlm_xcomposer2.py, modeling_internlm2.py,
build_mlp.py): every decoder projection is a PLoRA, an nn.Linear (W0, `bias`) with `Plora_A` [r, in] and `Plora_B`
[out, r]; rows where `im_mask` is set (the image embeddings) get W0 x + b + Plora_B(Plora_A(x)) * lora_scaling, the
others W0 x + b. InternLM2 packs Q, K, V in `wqkv` grouped per K/V head ([q_0 .. q_{g-1}, k, v] per head, g = heads
/ kv heads); the MLP is w2(silu(w1 x) * w3 x). The vision side is `vit.vision_tower` (transformers' CLIPVisionModel,
its position table resized to img_size / 14 per side, the last layer's patch rows, CLS dropped) and `vision_proj`
(Linear, GELU, Linear). The image rows replace `<ImageHere>` in the prompt.
"""
from __future__ import annotations

import re

from ..config import AdapterConfig, DecoderConfig, ModelConfig, VisionConfig
from ..errors import EdgemmError
from ..importers.shards import Source
from ..tokenizer import IMAGE

from . import Family, register
from .base import CLIP_MEAN, CLIP_STD, Plan, _clip_vision, _req

VIT = "vit.vision_tower.vision_model."
# config.json carries no vision config: build_mlp.py loads openai/clip-vit-large-patch14-336, whose heads are 64 wide
CLIP_HEAD_DIM = 64
# lora_scaling = lora_alpha / lora_r, which config.json does not carry either: modeling_internlm2.py builds every PLoRA
# of XComposer2-7B and -VL-7B with lora_r=256, lora_alpha=256; PLoRA's own defaults are lora_r=8, lora_alpha=16
PLORA_SCALING = {256: 1.0, 8: 2.0}
PROJ = {"qkv": "attention.wqkv", "o": "attention.wo", "gate": "feed_forward.w1", "up": "feed_forward.w3",
        "down": "feed_forward.w2"}

META = ("You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).\n- InternLM-XComposer (浦语·灵笔) is a "
        "multi-modality conversational language model that is developed by Shanghai AI Laboratory (上海人工智能实验室). "
        "It is designed to be helpful, honest, and harmless.\n- InternLM-XComposer (浦语·灵笔) can understand and "
        "communicate fluently in the language chosen by the user such as English and 中文.\n- InternLM-XComposer "
        "(浦语·灵笔) is capable of comprehending and articulating responses effectively based on the provided image.")
# The prompt of the release's chat() (interleav_wrap_chat): its default meta_instruction as the system turn unless
# one is given; each text part is tokenized with <s> prepended, so the text after an image starts with <s> again.
TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}[UNUSED_TOKEN_146]system{{ '\\n' }}"
    "{{ " + repr(META) + " }}[UNUSED_TOKEN_145]{{ '\\n' }}{% endif %}"
    "{% for m in messages %}[UNUSED_TOKEN_146]{{ m['role'] }}{{ '\\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% set n = m['content'] | selectattr('type', 'equalto', 'image') | list | length %}"
    "{{ '" + IMAGE + "' * n }}{% if n %}{{ bos_token }}{% endif %}"
    "{% for p in m['content'] %}{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
    "[UNUSED_TOKEN_145]{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}[UNUSED_TOKEN_146]assistant{{ '\\n' }}{% endif %}")


def qkv_order(H: int, K: int, E: int) -> list[int]:
    """Rows of InternLM2's wqkv ([q_0 .. q_{g-1}, k, v] per K/V head, E rows each) in edgemm's order (all Q heads,
    then K, then V; Q head h * g + j reads K/V head h)."""
    g = H // K
    q = [(h * (g + 2) + j) * E + e for h in range(K) for j in range(g) for e in range(E)]
    k = [(h * (g + 2) + g) * E + e for h in range(K) for e in range(E)]
    v = [(h * (g + 2) + g + 1) * E + e for h in range(K) for e in range(E)]
    return q + k + v


def _vision(hf: dict, src: Source, w: str) -> VisionConfig:
    """The CLIP tower's shape from its tensors, its image size from config.json's img_size."""
    sh = src.shapes
    pe = VIT + "embeddings.patch_embedding.weight"
    if pe not in sh:
        raise EdgemmError(f"{src.path} lacks {pe}: not XComposer2's released layout (vit.vision_tower)")
    width, _, patch, _ = sh[pe]
    layers = len({m.group(1) for k in sh for m in [re.match(re.escape(VIT) + r"encoder\.layers\.(\d+)\.", k)] if m})
    S = _req(hf, "img_size", w)
    pos = sh.get(VIT + "embeddings.position_embedding.weight", (0,))[0]
    if not isinstance(S, int) or S < patch or S % patch or pos != (S // patch) ** 2 + 1:
        raise EdgemmError(f"{w}: img_size {S} does not fit the tower's position table ({pos} rows for patch {patch}: "
                          f"(img_size / {patch})^2 + 1 expected)")
    if width % CLIP_HEAD_DIM:
        raise EdgemmError(f"{src.path}: vision width {width} is not a multiple of CLIP's head width {CLIP_HEAD_DIM}")
    return VisionConfig(image_size=S, patch_size=patch, width=width, layers=layers, heads=width // CLIP_HEAD_DIM,
                        mlp_dim=sh[VIT + "encoder.layers.0.mlp.fc1.weight"][0], eps=1e-5, gelu="quick",
                        image_mean=CLIP_MEAN, image_std=CLIP_STD, arch="clip", feature_layer=layers)


def _rank(src: Source, L: int) -> int:
    ranks = {src.shapes.get(f"model.layers.{i}.{p}.Plora_A.weight", (None,))[0]
             for i in range(L) for p in PROJ.values()}
    if None in ranks:
        raise EdgemmError(f"{src.path}: a decoder projection lacks its Plora_A/Plora_B (Partial-LoRA) weights")
    if len(ranks) != 1 or next(iter(ranks)) not in PLORA_SCALING:
        raise EdgemmError(f"{src.path}: Partial-LoRA ranks {sorted(ranks)}; edgemm imports one rank for every "
                          f"projection, {' or '.join(map(str, PLORA_SCALING))} (XComposer2-7B / -VL-7B)")
    return ranks.pop()


def map_xcomposer2(hf: dict, src: Source, rules: str = "original") -> Plan:
    w = "config.json"
    if any(k in src.where for k in ("plora_glb_GN", "plora_sub_GN")):
        raise EdgemmError(f"{src.path}: plora_glb_GN / plora_sub_GN are XComposer2-4KHD's (and 2.5's) HD tiling, "
                          "which edgemm does not import; XComposer2-7B and -VL-7B are supported")
    if hf.get("bias"):
        raise EdgemmError(f"{w}: bias true (wqkv and wo biases) is not supported; XComposer2 releases have none")
    if hf.get("hidden_act", "silu") != "silu":
        raise EdgemmError(f"{w}: hidden_act {hf['hidden_act']!r} is not supported (silu)")
    scaling = hf.get("rope_scaling")
    if scaling and (not isinstance(scaling, dict) or (scaling.get("type") or scaling.get("rope_type")) != "dynamic"):
        raise EdgemmError(f"{w}: rope_scaling {scaling} is not supported (InternLM2's dynamic NTK, or none)")
    D, H, L = _req(hf, "hidden_size", w), _req(hf, "num_attention_heads", w), _req(hf, "num_hidden_layers", w)
    K = hf.get("num_key_value_heads") or H
    if D % H or H % K:
        raise EdgemmError(f"{w}: hidden_size {D}, heads {H}, kv heads {K} do not divide")
    E, r = D // H, _rank(src, L)
    vision = _vision(hf, src, w)
    cfg = ModelConfig(
        name=src.path.name, vision=vision, adapter=AdapterConfig(kind="mlp", gelu="erf", bias=True),
        decoder=DecoderConfig(vocab_size=_req(hf, "vocab_size", w), d_model=D, n_layers=L, n_heads=H,
                              n_kv_heads=K if K != H else None, ffn_dim=_req(hf, "intermediate_size", w),
                              rope_theta=float(hf.get("rope_theta", 10000.0)), rms_eps=hf.get("rms_norm_eps", 1e-6),
                              max_seq_len=_req(hf, "max_position_embeddings", w),
                              tie_embeddings=bool(hf.get("tie_word_embeddings", False)), vision_delta_rank=r))
    plan = Plan(cfg)
    _clip_vision(plan, VIT, vision.layers, "CLIP's pooled-output norm: XComposer2 takes the last layer's hidden states")
    for n, i in (("linear_1", 0), ("linear_2", 2)):          # vision_proj: Linear, GELU, Linear
        for p in ("weight", "bias"):
            plan.add(f"adapter.{n}.{p}", f"vision_proj.{i}.{p}")
    plan.add("decoder.tok_embeddings.weight", "model.tok_embeddings.weight")
    plan.add("decoder.norm.weight", "model.norm.weight")
    if cfg.decoder.tie_embeddings:
        plan.ignore("output.weight", "tied to the token embedding")
    else:
        plan.add("decoder.lm_head.weight", "output.weight")
    order = qkv_order(H, K, E)
    s_ = PLORA_SCALING[r]
    for i in range(L):
        e, s = f"decoder.layers.{i}.", f"model.layers.{i}."
        plan.add(e + "attn_norm.weight", s + "attention_norm.weight")
        plan.add(e + "ffn_norm.weight", s + "ffn_norm.weight")
        for ours, theirs in PROJ.items():
            rows = (lambda t: t[0][order]) if ours == "qkv" else None
            plan.add(e + f"text.{ours}.weight", s + theirs + ".weight", fn=rows)
            plan.add(e + f"vision.{ours}.weight_A", s + theirs + ".Plora_A.weight")
            plan.add(e + f"vision.{ours}.weight_B", s + theirs + ".Plora_B.weight",
                     fn=(lambda t: t[0][order] * s_) if ours == "qkv" else (lambda t: t[0] * s_))
        plan.ignore(s + "attention.rotary_emb.inv_freq", "RoPE frequencies (recomputed from the config's rope_theta)")
    if scaling:
        plan.notes.append(f"rope_scaling {scaling}: InternLM2's dynamic NTK leaves RoPE plain up to "
                          f"max_position_embeddings ({cfg.decoder.max_seq_len}), edgemm's context limit")
    plan.notes.append(f"Partial-LoRA rank {r}, lora_scaling {s_} folded into Plora_B: image rows see W0 + B A, "
                      "text rows W0 (the vision branch shares the text branch's W0)")
    return plan


@register
class XComposer2(Family):
    name = "xcomposer2"
    model_types = ("internlmxcomposer2",)         # its config class's default; the released config.json says internlm2
    architectures = ("internlmxcomposer2forcausallm",)
    source = "InternLM-XComposer2 (`InternLMXComposer2ForCausalLM`, remote code)"
    computes = "CLIP tower, MLP projector, Partial-LoRA vision branch (W0 + B A on image rows)"
    blocks = ("vision:clip", "connector:mlp", "layer:low-rank-delta")
    core = ("low-rank delta vision branches (partial-lora)", "clip vision tower", "mlp projector")
    optional = ("grouped-query attention",)
    chat_template = TEMPLATE

    def detect(self, hf: dict) -> bool:
        auto = " ".join(map(str, (hf.get("auto_map") or {}).values())).lower()
        return super().detect(hf) or "internlmxcomposer2forcausallm" in auto

    def plan(self, hf, src, rules="original"):
        return map_xcomposer2(hf, src, rules)
