"""`--target gguf`: the decoder as a llama.cpp `cogvlm` GGUF, the vision stage as an mmproj GGUF (clip arch,
projector `cogvlm`), the tokenizer inside, and the manifest. Imported LLaVA models (single branch, CLIP tower, MLP
projector) go to llama.cpp's `llama` architecture (`qwen2` with QKV bias) and an mmproj with projector `mlp`;
MoE-LLaVA (Mixtral experts in every layer) as `llama` with ffn_gate_inp + ffn_{gate,up,down}_exps (Mixtral layout).

Tensor names and metadata keys follow llama.cpp (src/models/cogvlm.cpp, tools/mtmd/models/cogvlm.cpp,
tools/mtmd/clip.cpp, gguf-py's constants): the text branch under the ordinary names (blk.N.attn_qkv ...), the
vision branch under blk.N.vis_*. The decoder is written in f32 with the `gguf` package and quantized by llama.cpp's
own quantizer (llama_model_quantize). The mmproj is written by the `gguf` package at f32 / f16 / q8_0 / q4_0 (the
types llama.cpp's converter writes); K-quant requests for the vision stage fall back to q8_0, and it says so.

Before it reports success the export runs its files in llama.cpp and compares next-token logits with the
reference model for a text-only and an image prompt, and the mmproj's image rows with the reference vision stage.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from edgemm.errors import EdgemmError, UnsupportedVariant
from edgemm.export import TARGET_PRECISIONS

PRECISIONS = TARGET_PRECISIONS["gguf"]
# llama_ftype values (llama.h)
FTYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
# what the mmproj gets per requested precision (gguf-py quantizes f16/q8_0/q4_0; no K-quants for clip files)
VISION_TYPES = {"f32": "f32", "f16": "f16", "q8_0": "q8_0", "q4_0": "q4_0",
                "q4_k_m": "q8_0", "q5_k_m": "q8_0", "q6_k": "q8_0"}
# validation tolerances on next-token logits (max abs) by decoder precision; None: report only
LOGIT_TOL = {"f32": 1e-3, "f16": 5e-2}
ROWS_TOL = {"f32": 1e-3}
# The mmproj run through mtmd: ggml's CPU GELU reads an fp16 table (GGML_GELU_FP16), so image rows from llama.cpp
# differ from the reference at ~1e-3 relative on trained weights (measured 6.6e-3 max abs on tiny-shapes rows,
# 2.2e-3 on the logits that follow). Checked relative to the rows' scale, and the logits at MTMD_LOGIT_TOL;
# the decoder itself (reference rows in an embd batch) keeps the strict LOGIT_TOL.
MTMD_ROWS_RTOL = 5e-3
MTMD_LOGIT_TOL = 1e-2
# Fidelity of every decoder type on a fixed prompt set (FIDELITY_QUESTIONS about the validation image, reference
# image rows, FIDELITY_STEPS greedy steps teacher-forced with the reference's tokens): mean KL(reference ||
# llama.cpp) of the next-token distributions and top-1 agreement. Bounds: a working quantization is far inside
# them (tiny-shapes: see the note of the issue that set them), a broken tensor (zeroed scales) far outside.
FIDELITY_QUESTIONS = ("what color is the circle?", "how many shapes are there?", "where is the red square?",
                      "what shape is at the top left?", "what color is the triangle?", "is there a blue cross?")
FIDELITY_STEPS = 4
FIDELITY_KL = {"f32": 1e-4, "f16": 1e-3, "q8_0": 5e-3, "q6_k": 2e-2, "q5_k_m": 5e-2, "q4_k_m": 0.1, "q4_0": 0.15}
# top-1 agreement is gated where the reference is sure (top-1 probability ahead of the second by FIDELITY_MARGIN):
# a flip between near-tied tokens (random-weight models have flat logits) is reported, not a failure
FIDELITY_TOP1 = {"f32": 0.99, "f16": 0.95, "q8_0": 0.9, "q6_k": 0.85, "q5_k_m": 0.85, "q4_k_m": 0.85, "q4_0": 0.8}
FIDELITY_MARGIN = 0.2
VALIDATION_QUESTION = "what color is the circle?"

# The prompt format of edgemm.tokenizer, extended for OpenAI-style content lists (llama-cpp-python's multimodal
# chat handlers turn an image part into a text part holding the media marker): all parts but the last are
# emitted as they are (the image marker), the last text part is the question. No {{ bos_token }}: the file
# says add_bos_token, so llama.cpp's tokenizer puts <s> first (llama-cpp-python's handlers render bos_token as
# an empty string, which lost the <s> the model was trained with).
GGUF_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}"
    "{% if not loop.first %}{{ '\\n' }}{% endif %}"   # an expression: trim_blocks would eat a literal newline
    "{% if m['content'] is string %}{% if m.get('image') %}<image>{% endif %}Q: {{ m['content'] }}\nA:"
    "{% else %}{% for p in m['content'] %}{% if not loop.last %}"
    "{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endif %}{% endfor %}"
    "Q: {{ m['content'][-1]['text'] }}\nA:{% endif %}"
    "{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


# --------------------------------------------------------------------------- checks
# LLaVA (transformers' LlavaForConditionalGeneration imports): what llama.cpp's llama / qwen2 decoders and the `mlp`
# mmproj projector (tools/mtmd/models/llava.cpp) compute
def is_llava(cfg) -> bool:
    return cfg.decoder.single_branch and cfg.vision.arch == "clip" and cfg.adapter.kind == "mlp"


def decoder_arch(cfg) -> str:
    """llama.cpp's architecture for the decoder: cogvlm (edgemm's family), llama, or qwen2 (LLaMA + QKV bias)."""
    if not is_llava(cfg):
        return "cogvlm"
    return "qwen2" if cfg.decoder.qkv_bias else "llama"


def check_supported(cfg, log=print) -> None:
    """Refuse every config llama.cpp's graphs cannot compute; warn where it approximates."""
    from edgemm.blocks import support
    llava = is_llava(cfg)
    where = (f"the gguf exporter (llama.cpp's {decoder_arch(cfg)} architecture + mlp mmproj)" if llava
             else "the gguf exporter (llama.cpp's cogvlm architecture)")
    # the variants no llama.cpp graph here computes are named first (a BLIP-2 import is refused for its Q-Former)
    v = support.refusal(cfg, "gguf")            # the support matrix: llama.cpp's cogvlm graph, or its llava graph
    if v is not None:
        raise UnsupportedVariant(v, where, support.targets_that_can(v, exclude="gguf"))
    if cfg.vision.width % cfg.vision.heads:
        raise EdgemmError("vision width must be divisible by the vision heads")
    if llava:
        _check_moe(cfg.decoder, where)
        if cfg.vision.keep_cls:         # llava.cpp gathers the patch rows only (its `patches` input skips CLS)
            raise UnsupportedVariant("CLS row kept (vision_feature_select_strategy 'full')", where,
                                     support.targets_that_can("clip vision tower", exclude="gguf"))
        if cfg.vision.gelu == "erf":
            log("warning: this CLIP tower uses the erf GELU; llama.cpp's clip graph computes the tanh form "
                "(use_gelu), so the vision stage is approximated")
        if cfg.adapter.gelu != "tanh":
            log(f"warning: the projector's GELU is the {cfg.adapter.gelu} form; llama.cpp's mlp projector computes "
                "ggml_gelu (the tanh form), so the image rows are approximated")
        return
    if cfg.vision.gelu != "tanh" or cfg.adapter.gelu != "tanh":
        log("warning: this model uses the erf GELU; llama.cpp's cogvlm mmproj computes the tanh form "
            "(ggml_gelu), so the vision stage is approximated")
    if abs(cfg.adapter.eps - 1e-5) > 1e-12:
        log(f"warning: the adapter LayerNorm eps is {cfg.adapter.eps}; llama.cpp's cogvlm projector uses 1e-5")


def _check_moe(d, where: str) -> None:
    """llama.cpp's llama arch with experts (Mixtral's layout): every layer an MoE layer of n_ff-wide experts,
    softmax top-k weights renormalised (build_moe_ffn with norm_w)."""
    from edgemm.blocks.support import targets_that_can
    if not d.n_experts:
        return
    can = targets_that_can("mixture of experts", exclude="gguf")
    if not all(map(d.is_moe_layer, range(d.n_layers))):
        raise UnsupportedVariant("mixture of experts with dense layers between (moe_every / moe_dense_layers)", where,
                                 can)
    if not d.norm_topk_prob:
        raise UnsupportedVariant("mixture of experts without renormalised top-k weights", where, can)


# --------------------------------------------------------------------------- tokenizer
def tokenizer_fields(tok, vocab_size: int) -> dict:
    """A tokenizer.json -> llama.cpp tokenizer fields: byte-level BPE (edgemm's own, GPT-2 split) as llama.cpp's
    `gpt2` model (tokens, types, merges), LLaMA's SentencePiece-style BPE (byte fallback, "▁" for spaces) as its
    `llama` model (tokens, scores, types). Others are refused."""
    import gguf
    data = json.loads(tok.tok.to_str())
    model = data.get("model") or {}
    kind = model.get("type")
    if kind != "BPE":
        raise EdgemmError(f"the tokenizer is a {kind} model; the gguf export writes BPE tokenizers only (byte-level "
                          "BPE as llama.cpp's gpt2 tokenizer, LLaMA's SentencePiece BPE as its llama tokenizer); "
                          "other tokenizers: export to onnx or trt")
    vocab = tok.tok.get_vocab(with_added_tokens=True)
    if len(vocab) > vocab_size:
        raise EdgemmError(f"the tokenizer has {len(vocab)} tokens, more than the model's vocab {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for t, i in vocab.items():
        tokens[i] = t
        types[i] = gguf.TokenType.NORMAL
    for i, added in tok.tok.get_added_tokens_decoder().items():
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if model.get("byte_fallback"):
        return _spm_fields(data, tokens, types, merges, vocab_size)
    pre = data.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        raise EdgemmError(f"the tokenizer's pre-tokenizer {pre} has no llama.cpp equivalent; "
                          "edgemm exports byte-level BPE with the GPT-2 split (ByteLevel, no prefix space)")
    return {"model": "gpt2", "tokens": tokens, "types": types, "merges": merges}


def _spm_fields(data: dict, tokens: list, types: list, merges: list, vocab_size: int) -> dict:
    """LLaMA's tokenizer.json (BPE with byte fallback; "▁" prepended and for spaces, by the normalizer or a
    Metaspace pre-tokenizer) -> llama.cpp's `llama` (SentencePiece) fields. llama.cpp merges the adjacent pair
    whose token scores highest; a token's score is minus the rank of the merge that makes it, so the merge order
    is the tokenizer's. Byte tokens <0xXX> get type BYTE, the unknown token UNKNOWN."""
    import re
    import gguf
    norm, pre = data.get("normalizer") or {}, data.get("pre_tokenizer") or {}
    steps = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm] if norm else []
    llama_norm = [st.get("type") for st in steps] == ["Prepend", "Replace"] and steps[0].get("prepend") == "▁" \
        and steps[1].get("content") == "▁" and (steps[1].get("pattern") or {}).get("String") == " " and not pre
    metaspace = not steps and pre.get("type") == "Metaspace" and pre.get("replacement") == "▁" \
        and pre.get("prepend_scheme", "always") in ("always", "first") and not pre.get("split", False)
    if not (llama_norm or metaspace) or data["model"].get("ignore_merges"):
        raise EdgemmError("the tokenizer is a byte-fallback BPE but not LLaMA's SentencePiece form (normalizer "
                          "Prepend('▁') + Replace(' ', '▁'), or a non-splitting Metaspace pre-tokenizer); llama.cpp's "
                          "llama tokenizer cannot reproduce it")
    index = {t: i for i, t in enumerate(tokens)}
    scores = [-1e9] * vocab_size                     # made by no merge: single symbols, added tokens, padding
    for rank, m in enumerate(merges):
        i = index.get(m.replace(" ", "", 1))
        if i is not None and scores[i] == -1e9:
            scores[i] = -float(rank)
    for i, t in enumerate(tokens):
        if types[i] == gguf.TokenType.NORMAL and re.fullmatch(r"<0x[0-9A-F]{2}>", t):
            types[i] = gguf.TokenType.BYTE
    unk = data["model"].get("unk_token")
    if unk in index:
        types[index[unk]] = gguf.TokenType.UNKNOWN
    return {"model": "llama", "tokens": tokens, "types": types, "scores": scores,
            "unk_id": index.get(unk)}


# --------------------------------------------------------------------------- writers
def _np(t) -> np.ndarray:
    return t.detach().float().cpu().contiguous().numpy()


def write_decoder_gguf(model, tok, path: Path, name: str, chat_template: str | None = None,
                       tok_fields: dict | None = None) -> None:
    """The decoder in f32: arch cogvlm (text + vision branches, shared norms, embeddings, LM head), or for LLaVA
    arch llama / qwen2 (one branch). chat_template: what tokenizer.chat_template holds (None: edgemm's format)."""
    import gguf
    d = model.cfg.decoder
    arch = decoder_arch(model.cfg)
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_name(name)
    w.add_description("edgemm routed-visual-expert decoder (text branch: blk.N.*, vision branch: blk.N.vis_*)"
                      if arch == "cogvlm" else f"edgemm LLaVA decoder ({arch})")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(d.max_seq_len)
    w.add_embedding_length(d.d_model)
    w.add_block_count(d.n_layers)
    w.add_feed_forward_length(d.moe_ffn_dim if d.n_experts else d.ffn_dim)    # MoE: the experts' width (n_ff)
    if d.n_experts:                     # Mixtral layout: ffn_gate_inp + ffn_{gate,up,down}_exps in every layer
        w.add_expert_count(d.n_experts)
        w.add_expert_used_count(d.experts_top_k)
    w.add_head_count(d.n_heads)
    w.add_head_count_kv(d.kv_heads)
    w.add_layer_norm_rms_eps(d.rms_eps)
    w.add_rope_freq_base(d.rope_theta)
    w.add_rope_dimension_count(d.head_dim)
    w.add_vocab_size(d.vocab_size)
    tf = tok_fields or tokenizer_fields(tok, d.vocab_size)
    w.add_tokenizer_model(tf["model"])
    w.add_token_list(tf["tokens"])
    w.add_token_types(tf["types"])
    if tf["model"] == "gpt2":
        w.add_tokenizer_pre("gpt-2")
        w.add_token_merges(tf["merges"])
    else:                             # llama (SentencePiece): scores order the merges; "▁" before the text
        w.add_tokenizer_pre("default")
        w.add_token_scores(tf["scores"])
        w.add_add_space_prefix(True)
        if tf["unk_id"] is not None:
            w.add_unk_token_id(tf["unk_id"])
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(True)         # <s> first, as every edgemm prompt starts (the chat template has none)
    w.add_add_eos_token(False)
    w.add_chat_template(chat_template or GGUF_CHAT_TEMPLATE)

    dec = model.decoder
    w.add_tensor("token_embd.weight", _np(dec.tok_embeddings.weight))
    w.add_tensor("output_norm.weight", _np(dec.norm.weight))
    if not d.tie_embeddings:
        w.add_tensor("output.weight", _np(dec.lm_head.weight))
    for i, layer in enumerate(dec.layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", _np(layer.attn_norm.weight))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", _np(layer.ffn_norm.weight))
        if arch != "cogvlm":
            _write_attention(w, i, layer.text, d, permute=arch == "llama")
            _write_ffn(w, i, layer.text)
            continue
        for prefix, br in (("", layer.text), ("vis_", layer.vision)):
            w.add_tensor(f"blk.{i}.{prefix}attn_qkv.weight", _np(br.qkv.weight))
            w.add_tensor(f"blk.{i}.{'vis_attn_output' if prefix else 'attn_output'}.weight", _np(br.o.weight))
            w.add_tensor(f"blk.{i}.{prefix}{'gate' if prefix else 'ffn_gate'}.weight", _np(br.gate.weight))
            w.add_tensor(f"blk.{i}.{prefix}{'up' if prefix else 'ffn_up'}.weight", _np(br.up.weight))
            w.add_tensor(f"blk.{i}.{prefix}{'down' if prefix else 'ffn_down'}.weight", _np(br.down.weight))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def rope_permute(wt: np.ndarray, heads: int) -> np.ndarray:
    """Q or K rows (HF order: each head's rotary halves, NEOX rope) -> llama.cpp's llama order (pairs interleaved,
    its normal rope), as convert_hf_to_gguf.py's LlamaModel.permute does."""
    return wt.reshape(heads, 2, wt.shape[0] // heads // 2, *wt.shape[1:]).swapaxes(1, 2).reshape(wt.shape)


def _write_attention(w, i: int, br, d, permute: bool) -> None:
    """Separate attn_q / attn_k / attn_v (+ biases: qwen2) and attn_output of a single-branch layer."""
    H, K, E = d.n_heads, d.kv_heads, d.head_dim
    qkv = _np(br.qkv.weight)
    bias = None if br.qkv.bias is None else _np(br.qkv.bias)
    for n, lo, hi, heads in (("q", 0, H * E, H), ("k", H * E, (H + K) * E, K), ("v", (H + K) * E, (H + 2 * K) * E, 0)):
        wt = qkv[lo:hi]
        w.add_tensor(f"blk.{i}.attn_{n}.weight", rope_permute(wt, heads) if permute and heads else wt)
        if bias is not None:            # qwen2: NEOX rope, never permuted
            w.add_tensor(f"blk.{i}.attn_{n}.bias", bias[lo:hi])
    w.add_tensor(f"blk.{i}.attn_output.weight", _np(br.o.weight))


def _write_ffn(w, i: int, br) -> None:
    """The feed-forward tensors of one single-branch layer: the dense SwiGLU MLP, or an MoE layer's router
    (ffn_gate_inp [n_expert, n_embd]) and stacked experts (ffn_{gate,up}_exps [n_expert, n_ff, n_embd],
    ffn_down_exps [n_expert, n_embd, n_ff]; ggml's ne reversed), as llama.cpp's llama arch loads them."""
    if "moe" in br._modules:
        moe = br.moe
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", _np(moe.router.weight))
        for n in ("gate", "up", "down"):
            w.add_tensor(f"blk.{i}.ffn_{n}_exps.weight", _np(getattr(moe, n)))
        return
    w.add_tensor(f"blk.{i}.ffn_gate.weight", _np(br.gate.weight))
    w.add_tensor(f"blk.{i}.ffn_up.weight", _np(br.up.weight))
    w.add_tensor(f"blk.{i}.ffn_down.weight", _np(br.down.weight))


def _vision_tensor(w, name: str, arr: np.ndarray, qtype: str) -> str:
    """Matrices of linear layers get qtype (when their rows fit its blocks); the rest stay f32."""
    import gguf
    from gguf.quants import quantize
    is_matrix = arr.ndim == 2 and name.endswith(".weight") and not name.startswith(("v.position_embd",))
    if qtype == "f32" or not is_matrix:
        w.add_tensor(name, arr.astype(np.float32))
        return "f32"
    if qtype == "f16":
        w.add_tensor(name, arr.astype(np.float16))
        return "f16"
    gt = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[qtype]
    block = gguf.GGML_QUANT_SIZES[gt][0]
    if arr.shape[-1] % block:
        w.add_tensor(name, arr.astype(np.float16))
        return "f16"
    w.add_tensor(name, quantize(arr.astype(np.float32), gt), raw_dtype=gt)
    return qtype


def write_mmproj_gguf(model, path: Path, name: str, qtype: str) -> dict:
    """ViT + adapter + boi/eoi as llama.cpp's clip/mmproj file, projector cogvlm. -> {tensor: type}."""
    import gguf
    cfg, v = model.cfg, model.cfg.vision
    D = cfg.decoder.d_model
    w = gguf.GGUFWriter(str(path), arch="clip")
    w.add_name(f"{name} vision")
    w.add_description("edgemm vision stage: EVA-style ViT + GLU adapter + boi/eoi (llama.cpp projector cogvlm)")
    w.add_file_type({"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}[qtype])
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", "cogvlm")
    w.add_bool("clip.use_gelu", True)                     # FFN_GELU: ggml_gelu, the tanh form
    w.add_uint32("clip.vision.image_size", v.image_size)
    w.add_uint32("clip.vision.patch_size", v.patch_size)
    w.add_uint32("clip.vision.embedding_length", v.width)
    w.add_uint32("clip.vision.feed_forward_length", v.mlp_dim)
    w.add_uint32("clip.vision.block_count", v.layers)
    w.add_uint32("clip.vision.projection_dim", D)
    w.add_uint32("clip.vision.attention.head_count", v.heads)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", v.eps)
    w.add_array("clip.vision.image_mean", [float(x) for x in v.image_mean])
    w.add_array("clip.vision.image_std", [float(x) for x in v.image_std])

    types = {}
    vt, ad = model.vision, model.adapter

    def put(n, t):
        types[n] = _vision_tensor(w, n, _np(t) if not isinstance(t, np.ndarray) else t, qtype)

    # the patch conv stays f32 (im2col + matmul on its kernel), as do norms, biases and embeddings
    w.add_tensor("v.patch_embd.weight", _np(vt.patch_embed.weight))
    types["v.patch_embd.weight"] = "f32"
    put("v.patch_embd.bias", vt.patch_embed.bias)
    put("v.class_embd", _np(vt.cls).reshape(1, v.width))
    put("v.position_embd.weight", _np(vt.pos).reshape(v.n_patches + 1, v.width))
    for i, blk in enumerate(vt.blocks):
        for ours, theirs in (("qkv", "attn_qkv"), ("proj", "attn_out"), ("ln1", "ln1"), ("fc1", "ffn_up"),
                             ("fc2", "ffn_down"), ("ln2", "ln2")):
            mod = getattr(blk, ours)
            put(f"v.blk.{i}.{theirs}.weight", mod.weight)
            put(f"v.blk.{i}.{theirs}.bias", mod.bias)
    put("mm.model.fc.weight", ad.linear_proj.weight)
    put("mm.post_fc_norm.weight", ad.norm.weight)
    put("mm.post_fc_norm.bias", ad.norm.bias)
    put("mm.gate.weight", ad.gate.weight)
    put("mm.up.weight", ad.up.weight)
    put("mm.down.weight", ad.down.weight)
    put("v.boi", _np(ad.boi).reshape(1, D))
    put("v.eoi", _np(ad.eoi).reshape(1, D))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


def write_llava_mmproj_gguf(model, path: Path, name: str, qtype: str) -> dict:
    """CLIP tower + LLaVA's MLP projector as llama.cpp's clip/mmproj file, projector mlp. -> {tensor: type}.

    As tools/mtmd/models/llava.cpp reads it: separate attn_q/k/v per block, pre_ln, CLS + one position table
    (HF order: CLS first), mm.0 -> ggml_gelu -> mm.2. The blocks written are the ones LLaVA uses
    (vision_feature_layer); clip.vision.feature_layer names the last, so llama.cpp runs all of them (without it
    llava.cpp runs block_count - 1)."""
    import gguf
    cfg, v = model.cfg, model.cfg.vision
    D = cfg.decoder.d_model
    vt, pj = model.vision, model.adapter
    n_blocks = len(vt.blocks)
    w = gguf.GGUFWriter(str(path), arch="clip")
    w.add_name(f"{name} vision")
    w.add_description("edgemm vision stage: CLIP ViT + LLaVA MLP projector (llama.cpp projector mlp)")
    w.add_file_type({"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}[qtype])
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_llava_projector", True)
    w.add_string("clip.projector_type", "mlp")
    w.add_bool("clip.use_gelu", v.gelu != "quick")        # else FFN_GELU_QUICK, CLIP's quick_gelu
    w.add_uint32("clip.vision.image_size", v.image_size)
    w.add_uint32("clip.vision.patch_size", v.patch_size)
    w.add_uint32("clip.vision.embedding_length", v.width)
    w.add_uint32("clip.vision.feed_forward_length", v.mlp_dim)
    w.add_uint32("clip.vision.block_count", n_blocks)
    w.add_uint32("clip.vision.projection_dim", D)
    w.add_uint32("clip.vision.attention.head_count", v.heads)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", v.eps)
    w.add_array("clip.vision.feature_layer", [n_blocks])
    w.add_array("clip.vision.image_mean", [float(x) for x in v.image_mean])
    w.add_array("clip.vision.image_std", [float(x) for x in v.image_std])
    if v.grid_pinpoints:            # LLaVA-NeXT, as llama.cpp's converters write it (the [h, w] pairs flattened)
        w.add_array("clip.vision.image_grid_pinpoints", [int(x) for p in v.grid_pinpoints for x in p])
        w.add_string("clip.vision.mm_patch_merge_type", "spatial_unpad")

    types = {}

    def put(n, t):
        types[n] = _vision_tensor(w, n, _np(t) if not isinstance(t, np.ndarray) else t, qtype)

    if cfg.adapter.image_newline:
        put("model.image_newline", pj.image_newline)
    w.add_tensor("v.patch_embd.weight", _np(vt.patch_embed.weight))
    types["v.patch_embd.weight"] = "f32"
    put("v.class_embd", _np(vt.cls).reshape(v.width))
    put("v.position_embd.weight", _np(vt.pos).reshape(v.n_patches + 1, v.width))
    put("v.pre_ln.weight", vt.pre_norm.weight)
    put("v.pre_ln.bias", vt.pre_norm.bias)
    # clip.cpp swaps ffn_up/ffn_down of mlp-projector files whose ffn_down has n_embd inputs (legacy converters
    # named them the other way round); with mlp_dim == width that test cannot tell, so write the legacy order
    up, down = ("ffn_down", "ffn_up") if v.mlp_dim == v.width else ("ffn_up", "ffn_down")
    for i, blk in enumerate(vt.blocks):
        Wd = v.width
        for kind in ("weight", "bias"):
            qkv = _np(getattr(blk.qkv, kind))
            for j, n in enumerate(("attn_q", "attn_k", "attn_v")):
                put(f"v.blk.{i}.{n}.{kind}", qkv[j * Wd:(j + 1) * Wd])
            for ours, theirs in (("proj", "attn_out"), ("ln1", "ln1"), ("ln2", "ln2"), ("fc1", up), ("fc2", down)):
                put(f"v.blk.{i}.{theirs}.{kind}", getattr(getattr(blk, ours), kind))
    for ours, theirs in (("linear_1", "mm.0"), ("linear_2", "mm.2")):
        lin = getattr(pj, ours)
        put(f"{theirs}.weight", lin.weight)
        # llava.cpp adds mm.0 / mm.2 biases unconditionally: a bias-free projector gets zeros
        put(f"{theirs}.bias", lin.bias if lin.bias is not None else np.zeros(lin.weight.shape[0], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


def quantize_decoder(src: Path, dst: Path, precision: str, threads: int) -> None:
    """llama.cpp's own quantizer (llama_model_quantize) from the f32 file."""
    import ctypes
    from edgemm.llamacpp import load_llama_cpp
    ll = load_llama_cpp()
    p = ll.llama_model_quantize_default_params()
    p.nthread = threads
    p.ftype = FTYPES[precision]
    rc = ll.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0 or not dst.is_file():
        raise EdgemmError(f"llama_model_quantize to {precision} failed (code {rc})")


# --------------------------------------------------------------------------- inspection
def gguf_tensor_table(path: str | Path) -> list[dict]:
    """[{name, type, shape, bytes}] of a GGUF file (used by `edgemm info` and the manifest)."""
    from gguf import GGUFReader
    r = GGUFReader(str(path))
    return [{"name": t.name, "type": t.tensor_type.name.lower(), "shape": [int(s) for s in t.shape],
             "bytes": int(t.n_bytes)} for t in r.tensors]


def branch_of(name: str) -> str:
    """Which part of the model a GGUF tensor belongs to."""
    if name.startswith(("v.", "mm.")):
        return "vision stage"
    if ".vis_" in name:
        return "vision branch"
    if name.startswith("blk.") and not name.endswith(("attn_norm.weight", "ffn_norm.weight")):
        return "text branch"
    return "shared"


def type_summary(table: list[dict]) -> dict:
    out: dict[str, dict[str, int]] = {}
    for t in table:
        b = out.setdefault(branch_of(t["name"]), {})
        b[t["type"]] = b.get(t["type"], 0) + 1
    return out


# --------------------------------------------------------------------------- validation
def validation_image(cfg) -> np.ndarray:
    """A fixed test image at the tower's size (mtmd and edgemm then see the same pixels): a shapes scene when the
    tower is the shapes size, else seeded noise."""
    s = cfg.vision.image_size
    try:
        from edgemm import shapes
        if s == shapes.IMAGE_SIZE:
            return shapes.render(shapes.scene_at("test", 0))
    except Exception:
        pass
    return np.random.default_rng(0).integers(0, 256, (s, s, 3), dtype=np.uint8)


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def fidelity(model, tok, run, rows_ref) -> dict:
    """Mean KL(reference || llama.cpp) and top-1 agreement of next-token distributions on the fixed prompt set
    (bos, the reference's image rows, each question, then FIDELITY_STEPS reference-greedy steps)."""
    import torch
    from edgemm.model import KVCache
    cfg = model.cfg
    kls, agree = [], []
    for q in FIDELITY_QUESTIONS:
        q_ids = tok.user_turn(q, first=True)
        cache, pos = KVCache.empty(cfg.decoder, 1), 0
        with torch.inference_mode():
            for kind, data in (("text", torch.tensor([[tok.bos_id]])), ("image", rows_ref),
                               ("text", torch.tensor([q_ids]))):
                r, pos = model.forward_segment(kind, data, cache, pos)
        run.clear()
        run.decode_tokens([tok.bos_id], 0)
        run.decode_embd(rows_ref[0].numpy(), 1)
        g = run.decode_tokens(q_ids, 1 + rows_ref.shape[1])
        n = 1 + rows_ref.shape[1] + len(q_ids)
        for step in range(FIDELITY_STEPS + 1):
            rl = r[0, -1].float().numpy()
            lp, lq = _log_softmax(rl), _log_softmax(g)
            kls.append(float(np.sum(np.exp(lp) * (lp - lq))))
            top2 = np.sort(np.exp(lp))[-2:]
            agree.append((int(rl.argmax() == g.argmax()), bool(top2[1] - top2[0] > FIDELITY_MARGIN)))
            if step == FIDELITY_STEPS:
                break
            t = int(rl.argmax())
            with torch.inference_mode():
                r, pos = model.forward_segment("text", torch.tensor([[t]]), cache, pos)
            g = run.decode_tokens([t], n)
            n += 1
    sure = [a for a, confident in agree if confident]
    return {"prompts": len(FIDELITY_QUESTIONS), "positions": len(kls), "mean_kl": float(np.mean(kls)),
            "max_kl": float(np.max(kls)), "top1": float(np.mean([a for a, _ in agree])),
            "confident_positions": len(sure), "top1_confident": float(np.mean(sure)) if sure else None}


def llava_rows_cls_last(tower, projector, pixels):
    """What llama.cpp's llava graph computes while ggml-org/llama.cpp#25814 stands: the CLS row concatenated after
    the patches, position rows 0..P in that order, then rows 1..P (the last P-1 patches and CLS) projected.
    tower / projector: edgemm's ClipVisionTower / MlpProjector; pixels [1, 3, S, S] -> rows [1, P, D]."""
    import torch
    x = tower.patch_embed(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([x, tower.cls.expand(x.shape[0], -1, -1)], 1) + tower.pos
    x = tower.pre_norm(x)
    for blk in tower.blocks:
        x = blk(x)
    return projector(x[:, 1:])


def mtmd_cls_order_defect(model, pixels, rows_mt, max_abs: float, scale: float) -> bool:
    """True when mtmd's LLaVA image rows are off the reference but are the defect's rows (llava_rows_cls_last)."""
    import torch
    tol = MTMD_ROWS_RTOL * max(1.0, scale)
    if max_abs <= tol:
        return False
    with torch.inference_mode():
        sim = llava_rows_cls_last(model.vision, model.adapter, torch.from_numpy(pixels))[0].numpy()
    return bool(np.max(np.abs(rows_mt - sim)) <= tol)


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.2e}"


def _llava_rows_check(model, mmproj, pixels, hw, rows_ref, rows_mt, out: dict, log):
    """A LLaVA mmproj's image rows: the mmproj's weights through the reference code (what the backend falls back
    to) against the reference, and mtmd's rows, diagnosed. -> mtmd's rows, or None where not comparable."""
    import torch
    from edgemm.runtimes.llamacpp_backend import reference_vision_from_mmproj
    tower, proj = reference_vision_from_mmproj(mmproj, model.cfg)
    px = torch.from_numpy(pixels)
    with torch.inference_mode():
        rows_rc = proj(tower(px))
        if hw is not None:
            from edgemm.anyres import pack, row_index
            rows_rc = pack(rows_rc, proj.image_newline, row_index(model.cfg.vision, *hw))
    ref = rows_ref[0].numpy()
    out["vision_rows_reference_code_max_abs"] = float(np.max(np.abs(rows_rc[0].numpy() - ref)))
    if hw is not None:
        # mtmd tiles and packs LLaVA-NeXT images itself (its own resize and pad colour): its rows are reported,
        # not compared, and the backend packs the reference code's tile rows on the host
        out["mtmd_rows"], out["reference_rows"] = int(rows_mt.shape[0]), int(ref.shape[0])
        out["vision_rows_max_abs"] = None
        out["mtmd_cls_order_defect"] = None
        log(f"note: mtmd tiled the validation image into {rows_mt.shape[0]} rows (edgemm/transformers: "
            f"{ref.shape[0]}); any-resolution bundles run mtmd-free in edgemm's llamacpp backend")
        return None
    out["vision_rows_max_abs"] = float(np.max(np.abs(rows_mt - ref)))
    out["mtmd_cls_order_defect"] = mtmd_cls_order_defect(model, pixels, rows_mt, out["vision_rows_max_abs"],
                                                         out["vision_rows_scale"])
    if out["mtmd_cls_order_defect"]:
        log("warning: this llama.cpp's llava graph puts CLIP's CLS row after the patches while its inputs "
            "assume it first (ggml-org/llama.cpp#25814): mtmd's image rows are off for every CLIP-tower "
            "LLaVA. The mmproj is written as llama.cpp's converters write it (correct once that is fixed); "
            "edgemm's llamacpp backend computes the image rows from the mmproj's weights with the "
            "reference code meanwhile")
    return rows_mt


def validate(model, tok, decoder: Path, mmproj: Path, precision: dict, threads: int, log=print) -> dict:
    """Run the files in llama.cpp and compare with the reference. -> figures (raises when f32/f16 are off)."""
    import torch
    from edgemm.model import KVCache
    from edgemm.processor import preprocess
    from edgemm.runtimes.llamacpp_backend import LlamaRunner, MtmdVision
    cfg = model.cfg
    dprec, vprec = precision["decoder"], precision["vision"]
    q_ids = tok.user_turn(VALIDATION_QUESTION, first=True)
    img = validation_image(cfg)
    anyres = bool(cfg.vision.grid_pinpoints)
    if anyres:                      # LLaVA-NeXT: the tiles of the image, packed by the host (edgemm.anyres)
        from edgemm.anyres import preprocess_tiles
        pixels, hw = preprocess_tiles(img, cfg.vision)
    else:
        pixels = preprocess(img, cfg.vision)

    with torch.inference_mode():
        rows_ref = (model.encode_image_tiled(torch.from_numpy(pixels), *hw) if anyres
                    else model.encode_image(torch.from_numpy(pixels)))                # [1, rows, D]
        n_rows = rows_ref.shape[1]

        def ref(segs):
            cache, pos, logits = KVCache.empty(cfg.decoder, 1), 0, None
            for kind, data in segs:
                logits, pos = model.forward_segment(kind, data, cache, pos)
            return logits[0, -1].float().numpy()
        text_ids = torch.tensor([[tok.bos_id] + q_ids])
        ref_text = ref([("text", text_ids)])
        ref_img = ref([("text", torch.tensor([[tok.bos_id]])), ("image", rows_ref),
                       ("text", torch.tensor([q_ids]))])

    f32_kv = dprec == "f32"
    run = LlamaRunner(decoder, cfg.decoder.max_seq_len, threads, n_batch=max(512, n_rows), f32_kv=f32_kv)
    try:
        out = {"kv_cache": run.kv_type, "flash_attention": False}
        # tokenization: llama.cpp's gpt2 BPE vs edgemm's
        prompts = [f"Q: {VALIDATION_QUESTION}\nA:", " red</s>", "\nQ: how many shapes are there?\nA:",
                   " bottom left", "Q: Is there a  Purple cross?!\nA:"]
        out["tokenization_equal"] = all(run.tokenize(p, parse_special=True) == tok.encode(p) for p in prompts)
        lt = run.decode_tokens([tok.bos_id] + q_ids, 0)
        out["text_max_abs"] = float(np.max(np.abs(lt - ref_text)))
        out["text_top1_equal"] = bool(lt.argmax() == ref_text.argmax())
        run.clear()
        run.decode_tokens([tok.bos_id], 0)
        run.decode_embd(rows_ref[0].numpy(), 1)
        li = run.decode_tokens(q_ids, 1 + n_rows)
        out["image_max_abs"] = float(np.max(np.abs(li - ref_img)))
        out["image_top1_equal"] = bool(li.argmax() == ref_img.argmax())
        # the mmproj through llama.cpp's mtmd
        mt = MtmdVision(mmproj, run, threads)
        try:
            rows_mt = mt.encode_rgb(img)
        finally:
            mt.close()
        out["vision_rows_scale"] = float(np.max(np.abs(rows_ref[0].numpy())))
        if is_llava(cfg):
            rows_mt = _llava_rows_check(model, mmproj, pixels, hw if anyres else None, rows_ref, rows_mt, out, log)
        else:
            out["vision_rows_max_abs"] = float(np.max(np.abs(rows_mt - rows_ref[0].numpy())))
        if rows_mt is not None:
            run.rewind(1)
            run.decode_embd(rows_mt, 1)
            le = run.decode_tokens(q_ids, 1 + n_rows)
            out["image_mtmd_max_abs"] = float(np.max(np.abs(le - ref_img)))
            out["image_mtmd_top1_equal"] = bool(le.argmax() == ref_img.argmax())
        else:                       # not compared (any-resolution: mtmd tiles by its own rules)
            out["image_mtmd_max_abs"], out["image_mtmd_top1_equal"] = None, None
        out["fidelity"] = fidelity(model, tok, run, rows_ref)
    finally:
        run.close()
    fid = out["fidelity"]
    conf = fid["top1_confident"]
    log(f"validate: fidelity on {fid['prompts']} prompts x {fid['positions'] // fid['prompts']} positions: mean KL "
        f"{fid['mean_kl']:.2e} (bound {FIDELITY_KL[dprec]:g}), top-1 agreement {fid['top1']:.3f}, where the "
        f"reference is sure ({fid['confident_positions']} positions) "
        + (f"{conf:.3f}" if conf is not None else "n/a") + f" (bound {FIDELITY_TOP1[dprec]:g})")
    log(f"validate: llama.cpp vs reference ({dprec} decoder, {vprec} vision, KV cache {out['kv_cache']}, "
        f"flash attention off): next-token logits max abs  text-only {out['text_max_abs']:.2e}  "
        f"image {out['image_max_abs']:.2e}  image via mtmd {_fmt(out['image_mtmd_max_abs'])}; "
        f"mtmd image rows max abs {_fmt(out['vision_rows_max_abs'])}; top-1 equal "
        f"{out['text_top1_equal'] and out['image_top1_equal'] and out['image_mtmd_top1_equal'] is not False}; "
        f"tokenization equal {out['tokenization_equal']}")
    bad = []
    if not out["tokenization_equal"]:
        bad.append("llama.cpp tokenizes the test prompts differently from edgemm")
    for k in ("text_max_abs", "image_max_abs", "image_mtmd_max_abs", "vision_rows_max_abs"):
        if out[k] is not None and not np.isfinite(out[k]):              # None: not compared (any-resolution)
            bad.append(f"{k} is not finite")
    if not fid["mean_kl"] <= FIDELITY_KL[dprec]:
        bad.append(f"mean KL {fid['mean_kl']:.3g} > {FIDELITY_KL[dprec]:g} on the fidelity prompts")
    if conf is not None and not conf >= FIDELITY_TOP1[dprec]:
        bad.append(f"top-1 agreement {conf:.3f} < {FIDELITY_TOP1[dprec]:g} where the reference is sure")
    tol = LOGIT_TOL.get(dprec)
    if tol is not None:
        for k in ("text_max_abs", "image_max_abs"):
            if out[k] > tol:
                bad.append(f"{k} {out[k]:.2e} > {tol:g}")
        if vprec in ROWS_TOL and dprec == "f32" and "mtmd_rows" not in out \
                and not out.get("mtmd_cls_order_defect") and out["image_mtmd_max_abs"] > MTMD_LOGIT_TOL:
            bad.append(f"image_mtmd_max_abs {out['image_mtmd_max_abs']:.2e} > {MTMD_LOGIT_TOL:g}")
    if vprec in ROWS_TOL and out.get("vision_rows_reference_code_max_abs", 0.0) > ROWS_TOL[vprec]:
        bad.append(f"vision_rows_reference_code_max_abs {out['vision_rows_reference_code_max_abs']:.2e} > "
                   f"{ROWS_TOL[vprec]:g}")
    if vprec in ROWS_TOL and not out.get("mtmd_cls_order_defect") and "mtmd_rows" not in out:
        rtol = MTMD_ROWS_RTOL * max(1.0, out.get("vision_rows_scale", 1.0))
        if out["vision_rows_max_abs"] > rtol:
            bad.append(f"vision_rows_max_abs {out['vision_rows_max_abs']:.2e} > {rtol:.2e}")
    out["tolerance"] = tol
    out["passed"] = not bad
    if bad:
        raise EdgemmError("GGUF validation failed: " + "; ".join(bad))
    return out


# --------------------------------------------------------------------------- entry point
def _source(spec) -> dict:
    from edgemm.checkpoint import checkpoint_digest, resolve_model
    kind, path = resolve_model(spec)
    if kind == "dir":
        return {"model": str(Path(path).resolve()), "digest": checkpoint_digest(path)}
    return {"model": spec, "digest": None, "note": "random-weight preset (init_weights seed 0)"}


def export_gguf(model=None, out=None, precision=None, force=False, calib=None, no_build=False, log=print,
                threads: int | None = None) -> dict:
    """Export `model` (checkpoint dir or preset) to a GGUF bundle at `out`. -> the manifest."""
    log = log or (lambda s: None)
    from edgemm.bundle import bundle_writer, tool_versions, write_manifest
    from edgemm.checkpoint import load_model
    from edgemm.checkpoint import model_config
    if out is None:
        raise EdgemmError("-o OUT is required: the bundle directory to write")
    if isinstance(precision, str) or precision is None:
        precision = {"vision": precision or "q8_0", "decoder": precision or "q8_0"}
    precision = {"vision": precision.get("vision", "q8_0"), "decoder": precision.get("decoder", "q8_0")}
    for stage, p in precision.items():
        if p not in PRECISIONS:
            raise EdgemmError(f"--precision {p!r} is not a gguf type; choose one of {', '.join(PRECISIONS)}")
    if calib:
        log("note: GGUF quantization is weight-only (llama.cpp types); --calib is not used by --target gguf")
    cfg, _, _ = model_config(model)
    check_supported(cfg, log)
    from edgemm.llamacpp import load_llama_cpp
    load_llama_cpp()      # the quantizer and the validation need llama.cpp (with a CPU variant this machine runs)
    threads = threads or os.cpu_count() or 1
    src = _source(model)
    m, tok = load_model(model)
    tok_fields = tokenizer_fields(tok, cfg.decoder.vocab_size)   # one llama.cpp cannot read is refused up front
    name = cfg.name
    arch, llava = decoder_arch(cfg), is_llava(cfg)
    projector = "mlp" if llava else "cogvlm"
    from edgemm.checkpoint import chat_template_for
    template = chat_template_for(model)
    dprec, vprec = precision["decoder"], precision["vision"]
    vtype = VISION_TYPES[vprec]
    if vtype != vprec:
        log(f"note: llama.cpp's mmproj files take f32/f16/q8_0/q4_0 here; the vision stage is written as {vtype} "
            f"for --precision vision={vprec}")
    with bundle_writer(out, force=force) as tmp:
        dec_file, mm_file = f"decoder-{dprec}.gguf", f"mmproj-{vtype}.gguf"
        f32_path = tmp / ("decoder-f32.gguf" if dprec == "f32" else ".decoder-f32.tmp.gguf")
        log(f"writing the decoder ({arch}, f32) ...")
        # an imported model's own chat template goes into the file; edgemm's format as the GGUF form of it
        write_decoder_gguf(m, tok, f32_path, name, template if llava else None, tok_fields)
        if dprec != "f32":
            log(f"quantizing the decoder to {dprec} with llama.cpp (llama_model_quantize) ...")
            quantize_decoder(f32_path, tmp / dec_file, dprec, threads)
            f32_path.unlink()
        log(f"writing the mmproj (clip, projector {projector}, {vtype}) ...")
        vis_types = (write_llava_mmproj_gguf if llava else write_mmproj_gguf)(m, tmp / mm_file, name, vtype)
        tok.save(tmp / "tokenizer.json")
        (tmp / "chat_template.jinja").write_text(template)
        log("validating in llama.cpp ...")
        figures = validate(m, tok, tmp / dec_file, tmp / mm_file, {"decoder": dprec, "vision": vtype}, threads, log)
        dec_table = gguf_tensor_table(tmp / dec_file)
        manifest = {
            "target": "gguf",
            "model": cfg.to_dict(),
            "source": src,
            "reference": {"model": src["model"], "digest": src["digest"], "backend": "torch (edgemm.model)"},
            "precision": {"decoder": dprec, "vision": vtype, "requested": dict(precision)},
            "tokenizer": "tokenizer.json",
            "chat_template": "chat_template.jinja",
            "stages": {
                "vision": {"file": mm_file, "format": f"gguf mmproj (clip arch, projector {projector})",
                           "precision": vtype,
                           "runs_with": "reference code with the mmproj weights"
                           if figures.get("mtmd_cls_order_defect") or cfg.vision.grid_pinpoints else "llama.cpp mtmd",
                           "input": {"pixels": ["tiles" if cfg.vision.grid_pinpoints else "1", "3",
                                                cfg.vision.image_size, cfg.vision.image_size]},
                           "output": {"rows": ["1", cfg.n_image_rows, cfg.decoder.d_model]},
                           "tensor_types": type_summary([{"name": k, "type": t} for k, t in vis_types.items()])},
                "decoder": {"file": dec_file, "format": f"gguf (arch {arch})", "precision": dprec,
                            "quantizer": "llama_model_quantize" if dprec != "f32" else None,
                            "branches": {"decoder_text": "token batches -> blk.N.{attn_qkv,attn_output,ffn_*}",
                                         "decoder_image": "embedding batches -> blk.N.vis_*"} if not llava else
                            {"decoder_text": "token batches", "decoder_image": "embedding batches (same weights)"},
                            "tensor_types": type_summary(dec_table)},
            },
            "runtime": {"backend": "llamacpp", "image_rows": (
                            "the reference vision code with the mmproj weights (any-resolution tiles packed on the "
                            "host)" if cfg.vision.grid_pinpoints else
                            "the reference vision code with the mmproj weights (llama.cpp#25814)"
                            if figures.get("mtmd_cls_order_defect") else
                            "mtmd with the mmproj (8-bit images at the tower size; other pixels: the reference "
                            "vision code with the mmproj weights)"),
                        "kv_cache": "f32 for f32 bundles, else f16", "flash_attention": False},
            "validation": figures,
            "tools": tool_versions("gguf", "llama_cpp_python", "tokenizers"),
        }
        if cfg.vision.grid_pinpoints:       # the host side of LLaVA-NeXT tiling, as the onnx / trt bundles record it
            from edgemm.anyres import manifest_fields
            manifest["anyres"] = manifest_fields(m)
        manifest = write_manifest(tmp, manifest)
    log(f"wrote {out}: {dec_file} + {mm_file}")
    return manifest
