"""Libra -> edgemm (low-rank vision branches, per-modality norms, cross-modal K/V bridge)."""
from __future__ import annotations


from ..config import AdapterConfig, DecoderConfig, ModelConfig, VisionConfig
from ..errors import EdgemmError, UnsupportedVariant

from . import Family, register
from .base import Plan, _llama_layer, _lm_ends, _req, _rope_theta
from ..importers.shards import Source


def map_libra(hf: dict, src: Source, rules: str = "original") -> Plan:
    """YifanXu74/Libra's LibraForCausalLM: LLaMA text branch, low-rank vision branches (LibraLinear weight_A /
    weight_B), per-modality norms (input, post-attention, final), the rank-r cross-modal K/V bridge, and the
    image-token input embeddings. Libra's VQ image tokenizer and CLIP signal encoder are separate models."""
    w = "config.json"
    for key, bad in (("use_2d_rope", True), ("addition_mode", True)):
        if hf.get(key, False) == bad:
            raise UnsupportedVariant(f"libra {key}", "edgemm's reference model",
                                     "none (edgemm implements Libra's released setting: 1-D RoPE, routed branches)")
    D, H, L = _req(hf, "hidden_size", w), _req(hf, "num_attention_heads", w), _req(hf, "num_hidden_layers", w)
    if hf.get("num_key_value_heads", H) != H:
        raise EdgemmError(f"{w}: Libra's vision branches are multi-head; num_key_value_heads != num_attention_heads")
    res = _req(hf, "image_feature_resolution", w)
    mvt = hf.get("max_vision_token_length", res * res + 2)
    if mvt != res * res + 2:
        raise EdgemmError(f"{w}: max_vision_token_length {mvt} != image_feature_resolution^2 + 2")
    ratio = hf.get("vision_down_ratio", 4)
    bridge = hf.get("bridge_rank", 8) if hf.get("use_bridge", True) else None
    ncb = hf.get("vision_codebook_num", 2)
    if hf.get("hidden_act", "silu") != "silu":
        raise EdgemmError(f"{w}: hidden_act {hf['hidden_act']!r} is not supported (silu)")
    cfg = ModelConfig(
        name=src.path.name,
        vision=VisionConfig(image_size=res, patch_size=1, width=D, layers=0, heads=1, mlp_dim=1, arch="none"),
        adapter=AdapterConfig(kind="libra", codebooks=ncb, vision_vocab=hf.get("vision_vocab_size", 514),
                              signal_size=hf.get("contiguous_signal_size", 2048),
                              concat_signals=hf.get("concat_signals", True), norm_signals=hf.get("norm_signals", True),
                              position_embedding=mvt if hf.get("use_vision_position_embedding") else 0),
        decoder=DecoderConfig(vocab_size=_req(hf, "vocab_size", w), d_model=D, n_layers=L, n_heads=H,
                              ffn_dim=_req(hf, "intermediate_size", w), rope_theta=_rope_theta(hf, w),
                              rms_eps=hf.get("rms_norm_eps", 1e-6), max_seq_len=hf.get("max_position_embeddings", 2048),
                              tie_embeddings=bool(hf.get("tie_word_embeddings", False)), vision_down_ratio=ratio,
                              per_modality_norms=True, cross_modal_bridge=bridge))
    plan = Plan(cfg)
    m = "model."
    _lm_ends(plan, m, "lm_head.weight", cfg.decoder.tie_embeddings)
    plan.add("decoder.vision_norm.weight", m + "vision_norm.weight")
    for i in range(L):
        _llama_layer(plan, m, i, False)
        e, s = f"decoder.layers.{i}.", f"{m}layers.{i}."
        plan.add(e + "vision_attn_norm.weight", s + "vision_input_layernorm.weight")
        plan.add(e + "vision_ffn_norm.weight", s + "vision_post_attention_layernorm.weight")
        for n in ("q", "k", "v", "o"):
            for ab in ("A", "B"):
                plan.add(e + f"vision.{n}.weight_{ab}", s + f"self_attn.vision_{n}_proj.weight_{ab}")
        for n in ("gate", "up", "down"):
            for ab in ("A", "B"):
                plan.add(e + f"vision.{n}.weight_{ab}", s + f"mlp.vision_{n}_proj.weight_{ab}")
        if bridge:
            for kv in ("k", "v"):
                for br, on in (("text", "language"), ("vision", "vision")):
                    for ab in ("A", "B"):
                        plan.add(e + f"{br}.{kv}_bridge.weight_{ab}",
                                 s + f"self_attn.vision_{kv}_bridge_on_{on}.weight_{ab}")
    for i in range(ncb):
        plan.add(f"adapter.embed.{i}.weight", m + f"vision_embed_tokens.{i}.weight")
    if cfg.adapter.position_embedding:
        plan.add("adapter.pos.weight", m + "vision_position_embedding.weight")
    if cfg.adapter.signal_size:
        if cfg.adapter.concat_signals and cfg.adapter.norm_signals:
            plan.add("adapter.signal_norm.weight", m + "vision_signal_norm.weight")
        plan.add("adapter.processor.weight", m + "vision_contiguous_signal_processor.weight")
    why = "image-token prediction head (edgemm generates text; image generation is not imported)"
    for k in src.where:
        if k.startswith("vision_lm_head.") or k == "vision_hidden_placeholder":
            plan.ignore(k, why)
    for k in ("naive_placeholder", "vision_logits_placeholder", "language_logits_placeholder",
              "eoi_to_newline_logits_placeholder", m + "pos_offset"):
        plan.ignore(k, "constant buffer")
    if (src.path / TOKENIZER_CONFIG).is_file():
        _pixel_path(plan, src, res)
    else:
        plan.notes.append(f"no {TOKENIZER_CONFIG} beside the decoder: Libra's pixel path (its image tokenizer) is "
                          "not imported; image rows come from EdgeMM.encode_image_tokens(codes, signal)")
    return plan


TOKENIZER_CONFIG = "vision_tokenizer_config.yaml"


def _pixel_path(plan: Plan, src: Source, res: int) -> None:
    """Libra's image tokenizer as the released layout keeps it beside the decoder (README "CHECKPOINTS"):
    vision_tokenizer_config.yaml (ImageTokenizer's OmegaConf config: params.embed_dim, codebook_size, num_codebook,
    ckpt_path, ddconfig.encoder_name (the CLIP folder) and select_layer), the VQModel's Lightning checkpoint
    (vqgan.ckpt: the frozen CLIP under encoder.vision_tower.vision_model., quant_conv, quantize.project_in) and
    the CLIP folder (its config and preprocessor; its weights when the checkpoint lacks the encoder's)
    -> the libra_vq tower (edgemm.blocks.libra_vq) and Libra's eval preprocessing (Expand2Square + CLIP's)."""
    import json

    from ..importers.shards import load_pickle
    from ..safety import inside
    from .base import CLIP_MEAN, CLIP_STD, _act, _clip_vision
    w, d, a = TOKENIZER_CONFIG, src.path, plan.cfg.adapter
    try:
        import yaml
    except ImportError:
        raise EdgemmError(f"reading {w} needs PyYAML: pip install pyyaml") from None
    try:
        conf = yaml.safe_load((d / w).read_text())
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise EdgemmError(f"{d / w} is not valid YAML ({str(e).splitlines()[0][:120]})") from None
    p = conf.get("params") if isinstance(conf, dict) else None
    dd = p.get("ddconfig") if isinstance(p, dict) else None
    if not isinstance(dd, dict):
        raise EdgemmError(f"{w} lacks params.ddconfig (ImageTokenizer's VQModel settings)")
    enc = dd.get("encoder_name")
    if not isinstance(enc, str) or "clip" not in enc:
        raise UnsupportedVariant(f"libra tokenizer encoder {enc!r}", "edgemm's reference model",
                                 "none (edgemm imports the released CLIP-based tokenizer; the convolutional VQGAN "
                                 "encoder is not implemented)")
    cb, ncb, embed = _req(p, "codebook_size", w), p.get("num_codebook", 2), _req(p, "embed_dim", w)
    if cb + 2 != a.vision_vocab or ncb != a.codebooks:
        raise EdgemmError(f"{w}: codebook_size {cb} x num_codebook {ncb} does not match config.json's "
                          f"vision_vocab_size {a.vision_vocab} (codebook + boi + eoi) x vision_codebook_num {a.codebooks}")
    sel = dd.get("select_layer", -2)
    sel = list(sel) if isinstance(sel, (list, tuple)) else [sel]
    clip_dir = inside(d, enc, w)
    try:
        cc = json.loads((clip_dir / "config.json").read_text())
        pre = json.loads((clip_dir / "preprocessor_config.json").read_text()) \
            if (clip_dir / "preprocessor_config.json").is_file() else {}
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgemmError(f"{clip_dir}: the tokenizer's CLIP folder needs a readable config.json ({e})") from None
    vc, cw = cc.get("vision_config", cc), f"{enc}/config.json"
    if not src.allow_bin:
        raise EdgemmError(f"{p.get('ckpt_path')} (Libra's image tokenizer) is a pickled Lightning checkpoint; pass "
                          "--allow-bin to read it with torch.load(weights_only=True), nothing in it run")
    ckpt = inside(d, _req(p, "ckpt_path", w), w)
    tensors = {"image_tokenizer." + k[len("state_dict."):]: t for k, t in load_pickle(ckpt).items()
               if k.startswith("state_dict.") and hasattr(t, "shape")}
    tp = "image_tokenizer."
    if tp + "quant_conv.weight" not in tensors:
        raise EdgemmError(f"{ckpt} holds no state_dict with quant_conv (not Libra's VQModel checkpoint)")
    src.add_tensors(ckpt.name, tensors)
    added, vt = set(tensors), tp + "encoder.vision_tower.vision_model."
    if vt + "embeddings.patch_embedding.weight" not in tensors:          # the CLIP folder's own weights
        tower = Source(clip_dir, src.allow_bin)
        vt = "vision_model." if "vision_model.embeddings.patch_embedding.weight" in tower.where else ""
        src.merge(tower)
        added |= set(tower.where)
    v = plan.cfg.vision = VisionConfig(
        image_size=_req(vc, "image_size", cw), patch_size=_req(vc, "patch_size", cw), width=_req(vc, "hidden_size", cw),
        layers=_req(vc, "num_hidden_layers", cw), heads=_req(vc, "num_attention_heads", cw),
        mlp_dim=_req(vc, "intermediate_size", cw), eps=vc.get("layer_norm_eps", 1e-5),
        gelu=_act(vc.get("hidden_act", "quick_gelu"), cw), arch="libra_vq", pad_square=True,
        image_mean=tuple(pre.get("image_mean", CLIP_MEAN)), image_std=tuple(pre.get("image_std", CLIP_STD)),
        tokenizer={"feature_layers": sel, "embed_dim": embed})
    if v.image_size // v.patch_size != res:
        raise EdgemmError(f"{cw}: a {v.image_size // v.patch_size}-patch grid, but config.json's "
                          f"image_feature_resolution is {res}")
    from ..blocks.libra_vq import hidden_indices
    blocks = max(hidden_indices(v)) if all(isinstance(i, int) for i in sel) else 0
    _clip_vision(plan, vt, blocks, "Libra's tokenizer reads hidden states, not the pooled output", dst="vision.clip.")
    plan.add("vision.quant_conv.weight", tp + "quant_conv.weight", fn=lambda t: t[0][:, :, 0, 0])
    plan.add("vision.quant_conv.bias", tp + "quant_conv.bias")
    if embed != ncb * (cb.bit_length() - 1):
        for n in ("weight", "bias"):
            plan.add(f"vision.project_in.{n}", tp + f"quantize.project_in.{n}")
    used = {s for e in plan.entries for s in e.sources}
    for k in sorted(added - used):
        plan.ignore(k, "Libra's image tokenizer: its VQ decoder (image generation), LFQ's project_out and the "
                       "CLIP layers past the last selected one are not used to read images")
    plan.notes.append(f"Libra's image tokenizer imported from {w}: CLIP layers {sel}, {ncb} codebooks of {cb} codes")


@register
class Libra(Family):
    name = "libra"
    model_types = ("libra",)
    architectures = ("libraforcausallm",)
    source = "Libra"
    computes = "low-rank vision branches, cross-modal K/V bridge; images through its tokenizer (CLIP + LFQ codes)"
    hints = {"onnx": "image-token imports: fp32, fp16", "trt": "image-token imports: fp16"}
    blocks = ("connector:libra", "layer:low-rank", "layer:bridge")
    core = ("low-rank vision branches", "per-modality norms")
    optional = ("libra image tokens", "libra image tokenizer (pixels)", "cross-modal K/V bridge",
                "grouped-query attention")

    def plan(self, hf, src, rules="original"):
        return map_libra(hf, src, rules)
