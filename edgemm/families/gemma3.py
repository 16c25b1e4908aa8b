"""Gemma 3 (transformers' Gemma3ForConditionalGeneration, model_type "gemma3": gemma-3-4b/12b/27b-it) -> edgemm.

- the vision tower (SiglipVisionModel) as edgemm's SigLIP tower (edgemm.blocks.vision, arch "siglip"): every layer,
  then post_layernorm (the last_hidden_state the model takes);
- the projector (Gemma3MultiModalProjector) as connector:gemma3 (edgemm.blocks.connectors.Gemma3Projector): the patch
  grid average-pooled to mm_tokens_per_image rows, mm_soft_emb_norm, mm_input_projection_weight; the image segment's
  boi / eoi rows are the <start_of_image> / <end_of_image> embedding rows times sqrt(hidden_size);
- the language model (Gemma3TextModel) as the single-branch decoder with Gemma's options (edgemm.config.DecoderConfig):
  embeddings times sqrt(hidden_size), four norms a layer (input, post_attention, pre_feedforward, post_feedforward),
  per-head q/k norm, GELU-tanh gated MLP, scores scaled by query_pre_attn_scalar^-1/2, sliding-window attention on
  the layer_types' sliding layers with their own RoPE base (the full layers': rope_theta, linear scaling where set),
  and the image's rows attending to each other both ways (token_type_ids, as
  transformers 5.24 applies it in prefill: the soft tokens between <start_of_image> and <end_of_image>). Gemma's
  RMSNorm multiplies by (1 + w): every norm weight (the projector's too) is imported with the 1 added. A
  final_logit_softcapping in the config is not applied: transformers 5.24's Gemma3ForConditionalGeneration does not
  apply it either (only Gemma3ForCausalLM does), and the released configs set none;
- the processor: Gemma3ImageProcessor's one resize to image_size (no pan-and-scan), its resample filter, mean / std;
  the chat template's <start_of_image> becomes Gemma3Processor's "\\n\\n" + edgemm's <image> + "\\n\\n" (the image
  segment: boi, the pooled rows, eoi).
"""
from __future__ import annotations

from ..config import AdapterConfig, DecoderConfig, ModelConfig, VisionConfig
from ..errors import EdgemmError
from ..importers.shards import Source
from ..importers.tokenizer import _read_json
from ..tokenizer import IMAGE
from . import Family, register
from .base import Plan, _act, _req, _siglip_vision
from .idefics import _token
from .llava import decoder_plan, pick

BOI, EOI = "<start_of_image>", "<end_of_image>"


def _rope(tc: dict, wt: str) -> tuple[float, float, float]:
    """-> (the full layers' RoPE base, their linear scaling factor, the sliding layers' base), from rope_parameters
    (transformers 5.x) or rope_theta / rope_scaling / rope_local_base_freq (the released configs)."""
    rp = tc.get("rope_parameters") or {}
    full = {**(tc.get("rope_scaling") or {}), **(rp.get("full_attention") or {})}
    slide = rp.get("sliding_attention") or {}
    ftype, stype = (p.get("rope_type") or p.get("type") or "default" for p in (full, slide))
    if ftype not in ("default", "linear") or stype != "default":
        raise EdgemmError(f"{wt}: RoPE {ftype!r} (full layers) / {stype!r} (sliding layers) is not supported "
                          "(default, or linear on the full layers)")
    factor = float(full.get("factor", 1.0)) if ftype == "linear" else 1.0
    return (float(full.get("rope_theta", tc.get("rope_theta", 1_000_000.0))), factor,
            float(slide.get("rope_theta", tc.get("rope_local_base_freq", 10_000.0))))


def gemma3_decoder(hf: dict, tc: dict, wt: str) -> DecoderConfig:
    """Gemma3TextConfig -> the single-branch DecoderConfig with Gemma 3's options; what edgemm does not compute
    (attention logit soft-capping, attention biases, bidirectional text) is refused."""
    for k in ("attn_logit_softcapping", "attention_bias", "use_bidirectional_attention"):
        if tc.get(k):
            raise EdgemmError(f"{wt}: {k} {tc[k]!r} is not supported")
    if _act(tc.get("hidden_activation", "gelu_pytorch_tanh"), wt) != "tanh":
        raise EdgemmError(f"{wt}: hidden_activation {tc['hidden_activation']!r} is not supported (gelu_pytorch_tanh)")
    D, H, L = _req(tc, "hidden_size", wt), _req(tc, "num_attention_heads", wt), _req(tc, "num_hidden_layers", wt)
    E, kv = tc.get("head_dim", 256), tc.get("num_key_value_heads") or H
    types = tc.get("layer_types") or ["sliding_attention" if (i + 1) % tc.get("sliding_window_pattern", 6)
                                      else "full_attention" for i in range(L)]
    if len(types) != L or not set(types) <= {"sliding_attention", "full_attention"}:
        raise EdgemmError(f"{wt}: layer_types must name sliding_attention or full_attention for each of {L} layers")
    theta, factor, local = _rope(tc, wt)
    window = tc.get("sliding_window") or 0
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"] if window else []
    return DecoderConfig(vocab_size=_req(tc, "vocab_size", wt), d_model=D, n_layers=L, n_heads=H,
                         n_kv_heads=kv if kv != H else None, ffn_dim=_req(tc, "intermediate_size", wt),
                         rope_theta=theta, rope_linear_factor=factor, rope_local_theta=local,
                         rms_eps=tc.get("rms_norm_eps", 1e-6), max_seq_len=tc.get("max_position_embeddings", 131072),
                         tie_embeddings=bool(hf.get("tie_word_embeddings", tc.get("tie_word_embeddings", True))),
                         single_branch=True, attn_head_dim=E if E * H != D else 0, qk_norm=True, mlp="geglu",
                         embed_scale=D ** 0.5, sandwich_norms=True, query_scale=float(tc.get("query_pre_attn_scalar", 256)),
                         sliding_window=window, sliding_layers=sliding, image_bidirectional=True)


def _processor(src: Source, v: VisionConfig) -> None:
    """preprocessor_config.json (Gemma3ImageProcessor) -> resample, mean, std; pan-and-scan and other sizes refused."""
    p, w = _read_json(src.path / "preprocessor_config.json") or {}, "preprocessor_config.json"
    size = p.get("size") or {"height": v.image_size, "width": v.image_size}
    if p.get("do_pan_and_scan") or (size.get("height"), size.get("width")) != (v.image_size, v.image_size) or \
            p.get("do_resize") is False or p.get("do_rescale") is False or p.get("do_normalize") is False or \
            abs(p.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12 or p.get("resample", 2) not in (0, 1, 2, 3):
        raise EdgemmError(f"{w}: pan-and-scan, a size other than the tower's {v.image_size} px, resize / rescale / "
                          "normalize off, another rescale_factor or resample filter are not supported")
    v.resample = int(p.get("resample", 2))
    v.image_mean = tuple(p.get("image_mean", (0.5, 0.5, 0.5)))
    v.image_std = tuple(p.get("image_std", (0.5, 0.5, 0.5)))


def _plus_one(fn=None):
    """Gemma's RMSNorm weight w -> the (1 + w) edgemm's RMSNorm multiplies by."""
    return lambda t: (t[0] if fn is None else fn(t)).float() + 1.0


def map_gemma3(hf: dict, src: Source, rules: str = "original") -> Plan:
    """transformers' Gemma3ForConditionalGeneration: SigLIP + pooled RMSNorm-Linear projector + Gemma 3's LM."""
    w, wt, wv = "config.json", "config.json text_config", "config.json vision_config"
    tc, vc = _req(hf, "text_config", w), _req(hf, "vision_config", w)
    if vc.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise EdgemmError(f"{wv}: vision tower {vc['model_type']!r} is not supported (siglip_vision_model)")
    vl = _req(vc, "num_hidden_layers", wv)
    vision = VisionConfig(image_size=_req(vc, "image_size", wv), patch_size=_req(vc, "patch_size", wv),
                          width=_req(vc, "hidden_size", wv), layers=vl, heads=_req(vc, "num_attention_heads", wv),
                          mlp_dim=_req(vc, "intermediate_size", wv), eps=vc.get("layer_norm_eps", 1e-6),
                          gelu=_act(vc.get("hidden_act", "gelu_pytorch_tanh"), wv), arch="siglip", feature_layer=vl,
                          post_norm=True)
    cfg = ModelConfig(name=src.path.name, vision=vision,
                      adapter=AdapterConfig(kind="gemma3", pool_tokens=hf.get("mm_tokens_per_image", 256)),
                      decoder=gemma3_decoder(hf, tc, wt))
    _processor(src, cfg.vision)
    cfg.validate()
    names = set(src.where)
    plan = Plan(cfg)
    decoder_plan(plan, src)
    lm = pick(names, ("model.language_model.", "language_model.model."), "embed_tokens.weight")
    for e in plan.entries:                      # Gemma's four norms a layer; every norm weight as (1 + w)
        if e.name.endswith("norm.weight"):
            e.sources = tuple(s.replace("post_attention_layernorm", "pre_feedforward_layernorm")
                              for s in e.sources) if ".ffn_norm." in e.name else e.sources
            e.fn = _plus_one(e.fn)
    for i in range(cfg.decoder.n_layers):
        for ours, theirs in (("post_attn_norm", "post_attention_layernorm"), ("post_ffn_norm", "post_feedforward_layernorm")):
            plan.add(f"decoder.layers.{i}.{ours}.weight", f"{lm}layers.{i}.{theirs}.weight", fn=_plus_one())
    vt = pick(names, ("model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.",
                      "vision_tower."), "embeddings.patch_embedding.weight")  # (the releases'; transformers 5.x saves)
    _siglip_vision(plan, vt, vl, True, names)
    mp = pick(names, ("model.multi_modal_projector.", "multi_modal_projector."), "mm_input_projection_weight")
    plan.add("adapter.norm.weight", mp + "mm_soft_emb_norm.weight", fn=_plus_one())
    plan.add("adapter.proj.weight", mp + "mm_input_projection_weight", fn=lambda t: t[0].t().contiguous())
    emb, scale = lm + "embed_tokens.weight", cfg.decoder.embed_scale
    for n, tok in (("boi", BOI), ("eoi", EOI)):
        i = _token(src, tok)
        plan.add(f"adapter.{n}", emb, fn=lambda t, i=i: (t[0][i].float() * scale).reshape(1, 1, -1))
    d = cfg.decoder
    plan.notes.append(f"image: {BOI}, {cfg.adapter.pool_tokens} pooled rows (seeing each other both ways), {EOI}; "
                      f"{len(d.sliding_layers)} of {d.n_layers} layers attend over a {d.sliding_window}-row window")
    return plan


def release_template(template: str) -> str:
    """adapt_template's inverse: the stored template with <start_of_image> for an image again, as the release has
    it (what a GGUF's tokenizer.chat_template holds: llama.cpp's mtmd expands the image itself)."""
    return template.replace(f"'\\n\\n{IMAGE}\\n\\n'", f"'{BOI}'").replace(f"\n\n{IMAGE}\n\n", BOI)


@register
class Gemma3(Family):
    name = "gemma3"
    model_types = ("gemma3",)
    architectures = ("gemma3forconditionalgeneration",)
    source = "`Gemma3ForConditionalGeneration`"
    computes = "SigLIP tower, average pool + RMSNorm + Linear projector, Gemma 3 decoder (four norms a layer, " \
               "GeGLU, local/global RoPE, sliding window, bidirectional image rows)"
    blocks = ("vision:siglip", "connector:gemma3", "layer:single")
    core = ("single branch (llava)", "siglip vision tower", "gemma3 projector (avg pool, rmsnorm, linear)",
            "per-head q/k norm", "gemma decoder (scaled embeddings, sandwich norms, geglu, query scale, local rope "
            "base)", "bidirectional attention among an image's rows")
    optional = ("grouped-query attention", "head_dim of its own", "sliding-window attention")

    def plan(self, hf, src, rules="original"):
        return map_gemma3(hf, src, rules)

    def adapt_template(self, template: str, src) -> str:
        """The template's <start_of_image> stored as Gemma3Processor's expansion around edgemm's <image>."""
        return template.replace(f"'{BOI}'", f"'\\n\\n{IMAGE}\\n\\n'").replace(BOI, f"\n\n{IMAGE}\n\n")
