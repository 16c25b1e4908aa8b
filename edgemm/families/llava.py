"""LLaVA (transformers LlavaForConditionalGeneration layout) -> edgemm (single branch)."""
from __future__ import annotations


from ..config import AdapterConfig, DecoderConfig, ModelConfig, VisionConfig
from ..errors import EdgemmError

from . import Family, register
from .base import CLIP_MEAN, CLIP_STD, Plan, _act, _clip_vision, _llama_layer, _lm_ends, _req, _rope_theta
from ..importers.shards import Source


def _moe_fields(tc: dict, tmt: str, wt: str) -> dict:
    """DecoderConfig MoE fields of a Mixtral text_config (every layer an MoE layer, top-k renormalised) or a
    Qwen3-MoE one (decoder_sparse_step, mlp_only_layers, norm_topk_prob, moe_intermediate_size; per-head Q/K norm)."""
    if tmt not in ("mixtral", "qwen3_moe"):
        return {}
    n = tc.get("num_experts", tc.get("num_local_experts"))
    if n is None:
        raise EdgemmError(f"{wt} lacks the key 'num_local_experts'")
    k = _req(tc, "num_experts_per_tok", wt)
    if tmt == "mixtral":
        return {"n_experts": n, "experts_top_k": k, "norm_topk_prob": True}
    return {"n_experts": n, "experts_top_k": k, "norm_topk_prob": bool(tc.get("norm_topk_prob", False)),
            "expert_ffn_dim": _req(tc, "moe_intermediate_size", wt), "moe_every": tc.get("decoder_sparse_step", 1),
            "moe_dense_layers": list(tc.get("mlp_only_layers") or []), "qk_norm": True}


def _moe_block(plan: Plan, lm: str, i: int, n: int, names: set) -> None:
    """Router and stacked experts of one MoE layer: transformers 5's fused layout (mlp.gate, mlp.experts.gate_up_proj
    [n, 2F, D] = [gate | up], mlp.experts.down_proj) or the per-expert ones it saves (Mixtral: block_sparse_moe.gate,
    block_sparse_moe.experts.e.w1 = gate, w3 = up, w2 = down; Qwen3-MoE: mlp.gate, mlp.experts.e.gate_proj ...)."""
    import torch
    e, s = f"decoder.layers.{i}.text.moe.", f"{lm}layers.{i}."
    if s + "mlp.experts.gate_up_proj" in names:
        f = s + "mlp.experts."
        plan.add(e + "router.weight", s + "mlp.gate.weight")
        plan.add(e + "gate", f + "gate_up_proj", fn=lambda t: t[0][:, : t[0].shape[1] // 2])
        plan.add(e + "up", f + "gate_up_proj", fn=lambda t: t[0][:, t[0].shape[1] // 2:])
        plan.add(e + "down", f + "down_proj")
        return
    if s + "mlp.gate.weight" in names:                      # Qwen3-MoE, per expert
        plan.add(e + "router.weight", s + "mlp.gate.weight")
        for n_ in ("gate", "up", "down"):
            plan.add(e + n_, *(f"{s}mlp.experts.{j}.{n_}_proj.weight" for j in range(n)),
                     fn=lambda t: torch.stack(list(t)))
        return
    b = s + "block_sparse_moe."
    plan.add(e + "router.weight", b + "gate.weight")
    for ours, theirs in (("gate", "w1"), ("up", "w3"), ("down", "w2")):
        plan.add(e + ours, *(f"{b}experts.{j}.{theirs}.weight" for j in range(n)), fn=lambda t: torch.stack(list(t)))


LANGUAGE_MODELS = ("llama", "mistral", "qwen2", "mixtral", "qwen3_moe")


def decoder_config(hf: dict, tc: dict, wt: str) -> DecoderConfig:
    """A LLaVA-style checkpoint's text_config (Llama, Mistral, Qwen2, Mixtral, Qwen3-MoE) -> edgemm's single-branch
    DecoderConfig; what edgemm does not compute (MLP bias, sliding windows, o_proj bias, RoPE scaling) is refused.
    `hf`: the whole config.json (tie_word_embeddings may sit at its top level)."""
    tmt = tc.get("model_type", "llama")
    if tmt not in LANGUAGE_MODELS:
        raise EdgemmError(f"{wt}: language model {tmt!r} is not supported ({', '.join(LANGUAGE_MODELS)})")
    if tc.get("mlp_bias"):
        raise EdgemmError(f"{wt}: mlp_bias is not supported")
    if tmt == "qwen3_moe" and tc.get("use_sliding_window"):
        raise EdgemmError(f"{wt}: sliding-window attention is not supported")
    if tmt in ("llama", "qwen3_moe") and tc.get("attention_bias"):
        raise EdgemmError(f"{wt}: attention_bias (which biases o_proj too) is not supported")
    if tmt in ("mistral", "mixtral") and tc.get("sliding_window") not in (None, 0) and \
            tc["sliding_window"] < tc.get("max_position_embeddings", 0):
        raise EdgemmError(f"{wt}: sliding-window attention is not supported")
    if tc.get("hidden_act", "silu") != "silu":
        raise EdgemmError(f"{wt}: hidden_act {tc['hidden_act']!r} is not supported (silu)")
    D, H, L = _req(tc, "hidden_size", wt), _req(tc, "num_attention_heads", wt), _req(tc, "num_hidden_layers", wt)
    E = tc.get("head_dim") or D // H            # Qwen3 (and newer Llamas) may set the heads' width of their own
    kv = tc.get("num_key_value_heads") or H
    return DecoderConfig(vocab_size=_req(tc, "vocab_size", wt), d_model=D, n_layers=L, n_heads=H,
                         n_kv_heads=kv if kv != H else None, ffn_dim=_req(tc, "intermediate_size", wt),
                         rope_theta=_rope_theta(tc, wt), rms_eps=tc.get("rms_norm_eps", 1e-6),
                         max_seq_len=tc.get("max_position_embeddings", 4096),
                         tie_embeddings=bool(hf.get("tie_word_embeddings", tc.get("tie_word_embeddings", False))),
                         qkv_bias=tmt == "qwen2", single_branch=True, attn_head_dim=E if E * H != D else 0,
                         **_moe_fields(tc, tmt, wt))


def feature_layer(hf: dict, vc: dict, default: int) -> tuple[int, int, int]:
    """config.json's vision_feature_layer (`default` when absent: -2 for LLaVA, -1 for InternVL) -> (it, the
    tower's layers, the layers run before the features are taken: hidden_states[i] follows i layers)."""
    fl = hf.get("vision_feature_layer", default)
    if not isinstance(fl, int):
        raise EdgemmError(f"config.json: vision_feature_layer {fl!r} (several layers) is not supported")
    vl = _req(vc, "num_hidden_layers", "config.json vision_config")
    used = vl + 1 + fl if fl < 0 else fl
    if not 0 <= used <= vl:
        raise EdgemmError(f"config.json: vision_feature_layer {fl} is out of range for {vl} layers")
    return fl, vl, used


def clip_vision_config(vc: dict, wv: str, vl: int, used: int, keep_cls: bool) -> VisionConfig:
    """A CLIPVisionConfig (dict; `wv` names it in errors) -> edgemm's "clip" tower taking the hidden states after
    `used` of its `vl` layers (CLS row kept: keep_cls)."""
    return VisionConfig(image_size=_req(vc, "image_size", wv), patch_size=_req(vc, "patch_size", wv),
                        width=_req(vc, "hidden_size", wv), layers=vl, heads=_req(vc, "num_attention_heads", wv),
                        mlp_dim=_req(vc, "intermediate_size", wv), eps=vc.get("layer_norm_eps", 1e-5),
                        gelu=_act(vc.get("hidden_act", "quick_gelu"), wv), image_mean=CLIP_MEAN,
                        image_std=CLIP_STD, arch="clip", feature_layer=used, keep_cls=keep_cls)


def pick(names: set, cands: tuple, suffix: str) -> str:
    """The first prefix of cands under which the source has `suffix` (the layouts of transformers' versions)."""
    return next((c for c in cands if c + suffix in names), cands[0])


def decoder_plan(plan: Plan, src: Source) -> None:
    """The language model's tensors (transformers 4.x before 4.52, 4.52+ and 5.x layouts) for plan.cfg.decoder:
    embedding, final norm, LM head (or tied), the layers, MoE blocks, Qwen3's q/k norms."""
    d, names = plan.cfg.decoder, set(src.where)
    lm = pick(names, ("model.language_model.", "language_model.model.", "model.text_model.", "model."),
              "embed_tokens.weight")                    # (model.: LLaVA's original layout, edgemm.families.llava_original)
    head = "language_model.lm_head.weight" if "language_model.lm_head.weight" in names else "lm_head.weight"
    _lm_ends(plan, lm, head, d.tie_embeddings)
    for i in range(d.n_layers):
        _llama_layer(plan, lm, i, d.qkv_bias, mlp=not d.is_moe_layer(i))
        if d.is_moe_layer(i):
            _moe_block(plan, lm, i, d.n_experts, names)
        if d.qk_norm:
            for n in ("q_norm", "k_norm"):
                plan.add(f"decoder.layers.{i}.text.{n}.weight", f"{lm}layers.{i}.self_attn.{n}.weight")
    if d.n_experts:
        plan.notes.append(f"mixture of experts: {d.n_experts} experts, top-{d.experts_top_k}, "
                          f"in {sum(map(d.is_moe_layer, range(d.n_layers)))} of {d.n_layers} layers")


def map_llava(hf: dict, src: Source, rules: str = "original") -> Plan:
    """transformers' LlavaForConditionalGeneration (4.x and 5.x layouts): CLIP tower + MLP projector + LLaMA."""
    w = "config.json"
    tc, vc = _req(hf, "text_config", w), _req(hf, "vision_config", w)
    wt, wv = "config.json text_config", "config.json vision_config"
    vmt = vc.get("model_type", "clip_vision_model")
    decoder = decoder_config(hf, tc, wt)
    if vmt != "clip_vision_model":
        raise EdgemmError(f"{wv}: vision tower {vmt!r} is not supported (clip_vision_model)")
    fl, vl, used = feature_layer(hf, vc, -2)
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise EdgemmError(f"{w}: vision_feature_select_strategy {strategy!r} is not supported")
    cfg = ModelConfig(
        name=src.path.name,
        vision=clip_vision_config(vc, wv, vl, used, strategy == "full"),
        adapter=AdapterConfig(kind="mlp", gelu=_act(hf.get("projector_hidden_act", "gelu"), w),
                              bias=bool(hf.get("multimodal_projector_bias", True))),
        decoder=decoder)
    names = set(src.where)
    vt = pick(names, ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.",
                      "vision_tower."), "embeddings.patch_embedding.weight")
    pj = pick(names, ("model.multi_modal_projector.", "multi_modal_projector."), "linear_1.weight")
    plan = Plan(cfg)
    decoder_plan(plan, src)
    clip_tower_plan(plan, src, vt, used, vl, fl)
    projector_plan(plan, pj)
    plan.notes.append(f"image token id {hf.get('image_token_index', hf.get('image_token_id'))}: its rows are "
                      f"replaced by the {cfg.n_image_rows} image rows of the vision stage")
    return plan




def clip_tower_plan(plan: Plan, src: Source, vt: str, used: int, vl: int, fl: int) -> None:
    """LLaVA's CLIP tower under `vt`: its first `used` layers; the later ones (after vision_feature_layer `fl` of
    `vl`) and the pooled-output norm are listed as not imported."""
    _clip_vision(plan, vt, used, "CLIP's pooled-output norm: LLaVA takes hidden states before it")
    for i in range(used, vl):
        s = f"{vt}encoder.layers.{i}."
        for k in src.where:
            if k.startswith(s):
                plan.ignore(k, f"CLIP layer after vision_feature_layer {fl}: LLaVA does not use it")


def projector_plan(plan: Plan, pj: str) -> None:
    """LLaVA's MLP projector under `pj` (linear_1, linear_2, biases where the config has them)."""
    for n in ("linear_1", "linear_2"):
        plan.add(f"adapter.{n}.weight", pj + f"{n}.weight")
        if plan.cfg.adapter.bias:
            plan.add(f"adapter.{n}.bias", pj + f"{n}.bias")


def map_llava_next(hf: dict, src: Source, rules: str = "original") -> Plan:
    """transformers' LlavaNextForConditionalGeneration: LLaVA's plan + any-resolution tiling (edgemm.anyres)."""
    plan = map_llava(hf, src, rules)
    if hf.get("vision_feature_select_strategy", "default") != "default":
        raise EdgemmError("config.json: LLaVA-NeXT with vision_feature_select_strategy 'full' is not supported "
                          "(its tiles would carry a CLS row)")
    return anyres_plan(plan, hf, src, [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])


def anyres_plan(plan: Plan, hf: dict, src: Source, default_pins: list) -> Plan:
    """Any-resolution tiling on a LLaVA plan (LLaVA-NeXT, LLaVA-OneVision): config.json's image_grid_pinpoints (or
    the family's default), the newline row, and the processor's settings from preprocessor_config.json if present."""
    import json
    v = plan.cfg.vision
    pins = hf.get("image_grid_pinpoints") or default_pins
    pp = src.path / "preprocessor_config.json"
    if pp.is_file():
        w = "preprocessor_config.json"
        try:
            p = json.loads(pp.read_text())
        except json.JSONDecodeError as e:
            raise EdgemmError(f"{pp} is not valid JSON ({e})") from None
        if p.get("image_grid_pinpoints", pins) != pins:
            raise EdgemmError(f"{w}: image_grid_pinpoints {p['image_grid_pinpoints']} differ from config.json's {pins}")
        size, crop = p.get("size") or {}, p.get("crop_size") or {}
        for what, n in (("size", size.get("shortest_edge", size.get("height"))), ("crop_size", crop.get("height"))):
            if n not in (None, v.image_size):
                raise EdgemmError(f"{w}: {what} {n} differs from the tower's image_size {v.image_size}")
        if p.get("do_pad") is False:
            raise EdgemmError(f"{w}: do_pad false is not supported")
        v.image_mean = tuple(p.get("image_mean", v.image_mean))
        v.image_std = tuple(p.get("image_std", v.image_std))
    v.grid_pinpoints = [[int(a), int(b)] for a, b in pins]
    plan.cfg.adapter.image_newline = True
    plan.cfg.validate()
    names = set(src.where)
    plan.add("adapter.image_newline", next((n for n in ("model.image_newline", "image_newline") if n in names),
                                          "model.image_newline"))
    plan.notes = [n for n in plan.notes if not n.startswith("image token id")]
    plan.notes.append(f"image token id {hf.get('image_token_index', hf.get('image_token_id'))}: its rows are replaced "
                      f"by the image's rows (any-resolution tiling: up to {plan.cfg.n_image_rows} for one image)")
    return plan


@register
class Llava(Family):
    name = "llava"
    model_types = ("llava",)
    architectures = ("llavaforconditionalgeneration",)
    source = "`LlavaForConditionalGeneration` (Llama, Mistral, Qwen2, Mixtral / Qwen3-MoE language models)"
    computes = "one branch; MoE FFNs; Qwen3's per-head q/k norm and `head_dim` of its own"
    blocks = ("vision:clip", "connector:mlp", "layer:single", "layer:moe")
    core = ("single branch (llava)", "clip vision tower", "mlp projector")
    optional = ("grouped-query attention", "qkv bias", "mixture of experts", "per-head q/k norm", "head_dim of its own")

    def detect(self, hf: dict) -> bool:         # model_type "llava" with mm_vision_tower: the original layout's
        return "mm_vision_tower" not in hf and super().detect(hf)

    def plan(self, hf, src, rules="original"):
        return map_llava(hf, src, rules)


@register
class LlavaNext(Llava):
    name = "llava_next"
    model_types = ("llava_next",)
    architectures = ("llavanextforconditionalgeneration",)
    source = "`LlavaNextForConditionalGeneration`"
    computes = "any-resolution tiling (`--max-tiles N`)"
    blocks = ("vision:clip", "connector:mlp", "layer:single")
    core = Llava.core + ("any-resolution tiling",)

    def plan(self, hf, src, rules="original"):
        return map_llava_next(hf, src, rules)
