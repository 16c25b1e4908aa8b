"""BLIP-2 / InstructBLIP (transformers' Blip2ForConditionalGeneration / InstructBlipForConditionalGeneration
layouts) -> edgemm: BLIP ViT + Q-Former adapter (edgemm.qformer) + a single-branch LLaMA decoder.

The vision tower's fused QKV bias is read as saved by transformers 5.x (`self_attn.qkv.bias`, [q, k, v]) or as
older checkpoints store it (`self_attn.q_bias`, `self_attn.v_bias`: k has no bias, zeros are written).
Processor settings: the image size from vision_config, mean/std from preprocessor_config.json or the processor
layout's processor_config.json when present (else BlipImageProcessor's defaults, OpenAI CLIP's). InstructBLIP's
Q-Former tokenizer comes from the processor layout's qformer_tokenizer/ (edgemm.qformer.import_tokenizer).
"""
from __future__ import annotations

import json

from ..config import AdapterConfig, DecoderConfig, ModelConfig, VisionConfig
from ..errors import EdgemmError

from . import Family, register
from .base import CLIP_MEAN, CLIP_STD, Plan, _act, _cat, _llama_layer, _lm_ends, _req, _rope_theta, _zeros
from ..importers.shards import Source

TEXT_MODELS = ("llama",)


def _text_config(tc: dict, w: str) -> dict:
    """The LLaMA language model's DecoderConfig fields; other language models are refused by name."""
    tmt = tc.get("model_type", "llama")
    if tmt not in TEXT_MODELS:
        raise EdgemmError(f"{w}: language model {tmt!r} is not supported: edgemm imports BLIP-2 / InstructBLIP with a "
                          f"LLaMA-family decoder ({', '.join(TEXT_MODELS)}; e.g. InstructBLIP-Vicuna), not OPT or "
                          "Flan-T5 language models")
    for key, what in (("mlp_bias", "mlp_bias"), ("attention_bias", "attention_bias (which biases o_proj too)")):
        if tc.get(key):
            raise EdgemmError(f"{w}: {what} is not supported")
    if tc.get("hidden_act", "silu") != "silu":
        raise EdgemmError(f"{w}: hidden_act {tc['hidden_act']!r} is not supported (silu)")
    D, H = _req(tc, "hidden_size", w), _req(tc, "num_attention_heads", w)
    E = tc.get("head_dim") or D // H            # a heads' width of its own (as the LLaVA importer takes it)
    if not isinstance(E, int) or E <= 0 or E % 2:
        raise EdgemmError(f"{w}: head_dim {E!r} must be a positive even integer")
    kv = tc.get("num_key_value_heads") or H
    return dict(vocab_size=_req(tc, "vocab_size", w), d_model=D, n_layers=_req(tc, "num_hidden_layers", w), n_heads=H,
                n_kv_heads=kv if kv != H else None, ffn_dim=_req(tc, "intermediate_size", w),
                rope_theta=_rope_theta(tc, w), rms_eps=tc.get("rms_norm_eps", 1e-6),
                max_seq_len=tc.get("max_position_embeddings", 2048), single_branch=True,
                attn_head_dim=E if E * H != D else 0)


def _q0v(ts):
    """Older checkpoints' q_bias and v_bias -> the fused [q, k, v] bias (BLIP's k projection has none)."""
    import torch
    return _cat([ts[0], torch.zeros_like(ts[0]), ts[1]])


def _processor(src: Source, vc: dict) -> tuple[int, tuple, tuple]:
    size, mean, std = vc.get("image_size", 224), CLIP_MEAN, CLIP_STD
    f = src.path / "preprocessor_config.json"
    if not f.is_file():                     # transformers 5's processor layout: image_processor inside
        f = src.path / "processor_config.json"
    if f.is_file():
        try:
            pp = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise EdgemmError(f"{f} is not valid JSON ({e})") from None
        pp = pp.get("image_processor", pp)
        mean, std = tuple(pp.get("image_mean", mean)), tuple(pp.get("image_std", std))
        s = pp.get("size") or {}
        hw = (s.get("height"), s.get("width")) if isinstance(s, dict) else (s, s)
        if hw[0] is not None and (hw[0] != hw[1] or hw[0] != size):
            raise EdgemmError(f"{f}: size {s} differs from the tower's image_size {size} (edgemm resizes to the "
                              "tower's square size)")
    return size, mean, std


def map_blip2(hf: dict, src: Source, rules: str = "original") -> Plan:
    w = "config.json"
    instruct = str(hf.get("model_type", "")).lower() == "instructblip" or \
        "instructblipforconditionalgeneration" in " ".join(hf.get("architectures") or []).lower()
    tc, vc, qc = _req(hf, "text_config", w), _req(hf, "vision_config", w), _req(hf, "qformer_config", w)
    wv, wq = "config.json vision_config", "config.json qformer_config"
    if hf.get("use_decoder_only_language_model") is False:
        raise EdgemmError(f"{w}: an encoder-decoder language model (Flan-T5) is not supported; edgemm imports "
                          f"BLIP-2 / InstructBLIP with a LLaMA-family decoder ({', '.join(TEXT_MODELS)})")
    dec = _text_config(tc, "config.json text_config")
    tie = bool(hf.get("tie_word_embeddings", tc.get("tie_word_embeddings", False)))
    size, mean, std = _processor(src, vc)
    W, VL = _req(vc, "hidden_size", wv), _req(vc, "num_hidden_layers", wv)
    QW, QL = _req(qc, "hidden_size", wq), _req(qc, "num_hidden_layers", wq)
    if qc.get("encoder_hidden_size", W) != W:
        raise EdgemmError(f"{wq}: encoder_hidden_size {qc['encoder_hidden_size']} != the vision width {W}")
    if qc.get("position_embedding_type", "absolute") != "absolute":
        raise EdgemmError(f"{wq}: position_embedding_type {qc['position_embedding_type']!r} is not supported")
    freq = qc.get("cross_attention_frequency", 2)
    cfg = ModelConfig(
        name=src.path.name,
        vision=VisionConfig(image_size=size, patch_size=_req(vc, "patch_size", wv), width=W, layers=VL,
                            heads=_req(vc, "num_attention_heads", wv), mlp_dim=_req(vc, "intermediate_size", wv),
                            eps=vc.get("layer_norm_eps", 1e-6), gelu=_act(vc.get("hidden_act", "gelu"), wv),
                            image_mean=mean, image_std=std, arch="blip"),
        adapter=AdapterConfig(kind="qformer", eps=qc.get("layer_norm_eps", 1e-12), gelu=_act(qc.get("hidden_act", "gelu"), wq),
                              bias=True, query_tokens=_req(hf, "num_query_tokens", w), qformer_width=QW,
                              qformer_layers=QL, qformer_heads=_req(qc, "num_attention_heads", wq),
                              qformer_ffn=_req(qc, "intermediate_size", wq), cross_attention_frequency=freq,
                              qformer_text=instruct, qformer_vocab=qc.get("vocab_size", 0) if instruct else 0,
                              qformer_positions=qc.get("max_position_embeddings", 0) if instruct else 0),
        decoder=DecoderConfig(**dec, tie_embeddings=tie))
    names = set(src.where)
    plan = Plan(cfg)
    # the language model (LlamaForCausalLM inside: language_model.model.* / language_model.lm_head)
    lm = next((p for p in ("language_model.model.", "model.language_model.", "language_model.")
               if p + "embed_tokens.weight" in names), "language_model.model.")
    head = next((h for h in ("language_model.lm_head.weight", "lm_head.weight") if h in names),
                "language_model.lm_head.weight")
    _lm_ends(plan, lm, head, tie)
    for i in range(dec["n_layers"]):
        _llama_layer(plan, lm, i, False)
    # the vision tower
    pre = next((p for p in ("vision_model.", "model.vision_model.") if p + "post_layernorm.weight" in names),
               "vision_model.")
    em = pre + "embeddings."
    plan.add("vision.patch_embed.weight", em + "patch_embedding.weight")
    plan.add("vision.patch_embed.bias", em + "patch_embedding.bias")
    plan.add("vision.cls", em + "class_embedding")
    plan.add("vision.pos", em + "position_embedding")
    for n in ("weight", "bias"):
        plan.add(f"vision.post_norm.{n}", pre + f"post_layernorm.{n}")
    for i in range(VL):
        s, e = f"{pre}encoder.layers.{i}.", f"vision.blocks.{i}."
        a = s + "self_attn."
        plan.add(e + "qkv.weight", a + "qkv.weight")
        if a + "qkv.bias" in names:
            plan.add(e + "qkv.bias", a + "qkv.bias")
        elif a + "q_bias" in names:
            plan.add(e + "qkv.bias", a + "q_bias", a + "v_bias", fn=_q0v)
        else:                                                   # qkv_bias false
            plan.add(e + "qkv.bias", fn=lambda _: _zeros(3 * W))
        for n in ("weight", "bias"):
            for ours, theirs in (("proj", "self_attn.projection"), ("ln1", "layer_norm1"), ("ln2", "layer_norm2"),
                                 ("fc1", "mlp.fc1"), ("fc2", "mlp.fc2")):
                plan.add(e + f"{ours}.{n}", s + f"{theirs}.{n}")
    # the Q-Former
    qf = next((p for p in ("qformer.", "model.qformer.") if p + "encoder.layer.0.attention.attention.query.weight"
               in names), "qformer.")
    plan.add("adapter.query", next((q for q in ("query_tokens", "model.query_tokens") if q in names), "query_tokens"))
    norm = qf + ("embeddings.layernorm." if instruct else "layernorm.")
    if instruct:
        plan.add("adapter.word_embed.weight", qf + "embeddings.word_embeddings.weight")
        plan.add("adapter.pos_embed.weight", qf + "embeddings.position_embeddings.weight")
        plan.ignore(qf + "embeddings.position_ids", "position index buffer")
    for n in ("weight", "bias"):
        plan.add(f"adapter.norm.{n}", norm + n)
        plan.add(f"adapter.proj.{n}", next((p for p in ("language_projection.", "model.language_projection.")
                                            if p + "weight" in names), "language_projection.") + n)
    for i in range(QL):
        s, e = f"{qf}encoder.layer.{i}.", f"adapter.layers.{i}."
        attns = [("attention.", "self_attn.")] + ([("crossattention.", "cross_attn.")] if i % freq == 0 else [])
        ffns = [("intermediate_query.", "output_query.", "ffn.")]
        text_ffn = ("intermediate.", "output.", "ffn_text.")
        if instruct:
            ffns.append(text_ffn)
        else:
            for k in src.where:
                if k.startswith((s + text_ffn[0], s + text_ffn[1])):
                    plan.ignore(k, "the Q-Former's text feed-forward (BLIP-2's generation feeds it no text)")
        for n in ("weight", "bias"):
            for hs, es in attns:
                for hn, en in (("query", "q"), ("key", "k"), ("value", "v")):
                    plan.add(e + f"{es}{en}.{n}", s + f"{hs}attention.{hn}.{n}")
                plan.add(e + f"{es}o.{n}", s + f"{hs}output.dense.{n}")
                plan.add(e + f"{es}norm.{n}", s + f"{hs}output.LayerNorm.{n}")
            for inter, out, es in ffns:
                plan.add(e + f"{es}fc1.{n}", s + f"{inter}dense.{n}")
                plan.add(e + f"{es}fc2.{n}", s + f"{out}dense.{n}")
                plan.add(e + f"{es}norm.{n}", s + f"{out}LayerNorm.{n}")
    tok = hf.get("image_token_index", hf.get("image_token_id"))
    plan.notes.append(f"image token id {tok}: its {cfg.n_image_rows} placeholder rows are the Q-Former's query rows "
                      "(the vision stage's output)")
    if instruct:
        plan.notes.append("InstructBLIP: the vision stage also takes the question's ids in the Q-Former's own "
                          "tokenizer (qformer_tokenizer/, imported as qformer_tokenizer.json); the runtimes encode "
                          "the image once the question it comes with is known")
    return plan


@register
class Blip2(Family):
    name = "blip2"
    model_types = ("blip-2",)
    architectures = ("blip2forconditionalgeneration",)
    source = "`Blip2ForConditionalGeneration` (Llama LM)"
    computes = "Q-Former: `num_query_tokens` rows per image (32 in BLIP-2)"
    blocks = ("vision:blip", "connector:qformer", "layer:single")
    core = ("single branch (llava)", "blip vision tower", "q-former adapter")
    optional = ("grouped-query attention", "head_dim of its own")

    def plan(self, hf, src, rules="original"):
        return map_blip2(hf, src, rules)


@register
class InstructBlip(Blip2):
    name = "instructblip"
    model_types = ("instructblip",)
    architectures = ("instructblipforconditionalgeneration",)
    source = "`InstructBlipForConditionalGeneration` (Llama LM)"
    computes = "Q-Former reading the instruction too"
    core = Blip2.core + ("q-former instruction input (instructblip)",)
