"""LLaVA (transformers LlavaForConditionalGeneration layout) -> edgemm (single branch)."""
from __future__ import annotations


from ..config import AdapterConfig, DecoderConfig, ModelConfig, VisionConfig
from ..errors import EdgemmError

from .base import CLIP_MEAN, CLIP_STD, Plan, _act, _cat, _llama_layer, _req, _rope_theta
from .shards import Source


def map_llava(hf: dict, src: Source, rules: str = "original") -> Plan:
    """transformers' LlavaForConditionalGeneration (4.x and 5.x layouts): CLIP tower + MLP projector + LLaMA."""
    w = "config.json"
    tc, vc = _req(hf, "text_config", w), _req(hf, "vision_config", w)
    wt, wv = "config.json text_config", "config.json vision_config"
    tmt, vmt = tc.get("model_type", "llama"), vc.get("model_type", "clip_vision_model")
    if tmt not in ("llama", "mistral", "qwen2"):
        raise EdgemmError(f"{wt}: language model {tmt!r} is not supported (llama, mistral, qwen2)")
    if vmt != "clip_vision_model":
        raise EdgemmError(f"{wv}: vision tower {vmt!r} is not supported (clip_vision_model)")
    if tc.get("mlp_bias"):
        raise EdgemmError(f"{wt}: mlp_bias is not supported")
    if tmt == "llama" and tc.get("attention_bias"):
        raise EdgemmError(f"{wt}: attention_bias (which biases o_proj too) is not supported")
    if tmt == "mistral" and tc.get("sliding_window") not in (None, 0) and \
            tc["sliding_window"] < tc.get("max_position_embeddings", 0):
        raise EdgemmError(f"{wt}: sliding-window attention is not supported")
    D, H, L = _req(tc, "hidden_size", wt), _req(tc, "num_attention_heads", wt), _req(tc, "num_hidden_layers", wt)
    if tc.get("head_dim") not in (None, D // H):
        raise EdgemmError(f"{wt}: head_dim {tc['head_dim']} != hidden_size / num_attention_heads")
    kv = tc.get("num_key_value_heads") or H
    fl = hf.get("vision_feature_layer", -2)
    if not isinstance(fl, int):
        raise EdgemmError(f"{w}: vision_feature_layer {fl!r} (several layers) is not supported")
    vl = _req(vc, "num_hidden_layers", wv)
    used = vl + 1 + fl if fl < 0 else fl
    if not 0 <= used <= vl:
        raise EdgemmError(f"{w}: vision_feature_layer {fl} is out of range for {vl} layers")
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise EdgemmError(f"{w}: vision_feature_select_strategy {strategy!r} is not supported")
    tie = bool(hf.get("tie_word_embeddings", tc.get("tie_word_embeddings", False)))
    qkv_bias = tmt == "qwen2"
    cfg = ModelConfig(
        name=src.path.name,
        vision=VisionConfig(image_size=_req(vc, "image_size", wv), patch_size=_req(vc, "patch_size", wv),
                            width=_req(vc, "hidden_size", wv), layers=vl, heads=_req(vc, "num_attention_heads", wv),
                            mlp_dim=_req(vc, "intermediate_size", wv), eps=vc.get("layer_norm_eps", 1e-5),
                            gelu=_act(vc.get("hidden_act", "quick_gelu"), wv), image_mean=CLIP_MEAN,
                            image_std=CLIP_STD, arch="clip", feature_layer=used, keep_cls=strategy == "full"),
        adapter=AdapterConfig(kind="mlp", gelu=_act(hf.get("projector_hidden_act", "gelu"), w),
                              bias=bool(hf.get("multimodal_projector_bias", True))),
        decoder=DecoderConfig(vocab_size=_req(tc, "vocab_size", wt), d_model=D, n_layers=L, n_heads=H,
                              n_kv_heads=kv if kv != H else None, ffn_dim=_req(tc, "intermediate_size", wt),
                              rope_theta=_rope_theta(tc, wt), rms_eps=tc.get("rms_norm_eps", 1e-6),
                              max_seq_len=tc.get("max_position_embeddings", 4096), tie_embeddings=tie,
                              qkv_bias=qkv_bias, single_branch=True))
    if tc.get("hidden_act", "silu") != "silu":
        raise EdgemmError(f"{wt}: hidden_act {tc['hidden_act']!r} is not supported (silu)")
    # transformers 4.x before 4.52, 4.52+, and 5.x's save format (vision tower without `vision_model.`)
    names = set(src.where)

    def pick(cands, suffix):
        return next((c for c in cands if c + suffix in names), cands[0])
    lm = pick(("model.language_model.", "language_model.model."), "embed_tokens.weight")
    vt = pick(("model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.",
               "vision_tower."), "embeddings.patch_embedding.weight")
    pj = pick(("model.multi_modal_projector.", "multi_modal_projector."), "linear_1.weight")
    head = "language_model.lm_head.weight" if "language_model.lm_head.weight" in names else "lm_head.weight"
    plan = Plan(cfg)
    plan.add("decoder.tok_embeddings.weight", lm + "embed_tokens.weight")
    plan.add("decoder.norm.weight", lm + "norm.weight")
    if tie:
        plan.ignore(head, "tied to the token embedding")
    else:
        plan.add("decoder.lm_head.weight", head)
    for i in range(L):
        _llama_layer(plan, lm, i, qkv_bias)
    em = vt + "embeddings."
    plan.add("vision.patch_embed.weight", em + "patch_embedding.weight")
    plan.add("vision.cls", em + "class_embedding", fn=lambda t: t[0].reshape(1, 1, -1))
    plan.add("vision.pos", em + "position_embedding.weight", fn=lambda t: t[0].unsqueeze(0))
    plan.ignore(em + "position_ids", "position index buffer")
    for n in ("weight", "bias"):
        plan.add(f"vision.pre_norm.{n}", vt + f"pre_layrnorm.{n}")
        plan.ignore(vt + f"post_layernorm.{n}", "CLIP's pooled-output norm: LLaVA takes hidden states before it")
    for i in range(vl):
        s = f"{vt}encoder.layers.{i}."
        if i >= used:
            for k in src.where:
                if k.startswith(s):
                    plan.ignore(k, f"CLIP layer after vision_feature_layer {fl}: LLaVA does not use it")
            continue
        e = f"vision.blocks.{i}."
        a = s + "self_attn."
        for n in ("weight", "bias"):
            plan.add(e + f"qkv.{n}", a + f"q_proj.{n}", a + f"k_proj.{n}", a + f"v_proj.{n}", fn=_cat)
            plan.add(e + f"proj.{n}", a + f"out_proj.{n}")
            plan.add(e + f"ln1.{n}", s + f"layer_norm1.{n}")
            plan.add(e + f"ln2.{n}", s + f"layer_norm2.{n}")
            plan.add(e + f"fc1.{n}", s + f"mlp.fc1.{n}")
            plan.add(e + f"fc2.{n}", s + f"mlp.fc2.{n}")
    for n in ("linear_1", "linear_2"):
        plan.add(f"adapter.{n}.weight", pj + f"{n}.weight")
        if cfg.adapter.bias:
            plan.add(f"adapter.{n}.bias", pj + f"{n}.bias")
    plan.notes.append(f"image token id {hf.get('image_token_index', hf.get('image_token_id'))}: its rows are "
                      f"replaced by the {cfg.n_image_rows} image rows of the vision stage")
    return plan


