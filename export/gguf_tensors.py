"""GGUF tensor layout: the decoder file (llama.cpp's cogvlm arch: text branch under the ordinary names
blk.N.attn_qkv ..., vision branch under blk.N.vis_*; LLaVA as llama / qwen2 with separate attn_q/k/v, MoE-LLaVA
with ffn_gate_inp + ffn_{gate,up,down}_exps as Mixtral), the mmproj file (clip arch, projector cogvlm or mlp), and
reading a file's tensor table back (which part of the model each tensor belongs to).

Tensor names and metadata keys follow llama.cpp (src/models/cogvlm.cpp, tools/mtmd/models/cogvlm.cpp,
tools/mtmd/models/llava.cpp, tools/mtmd/clip.cpp, gguf-py's constants)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgemm.export.gguf_archs import DECODER_ARCHS, _np
from edgemm.export.gguf_quant import add_vision_tensor, mmproj_file_type
from edgemm.export.gguf_tokenizer import add_tokenizer, tokenizer_fields


# --------------------------------------------------------------------------- writers
def write_decoder(model, tok, path: Path, name: str, arch: str, chat_template: str | None = None,
                  tok_fields: dict | None = None) -> None:
    """The decoder in f32 as llama.cpp's `arch` (DECODER_ARCHS: cogvlm for edgemm's own family, llama / qwen2 /
    qwen2vl / gemma3 for single-branch ones). chat_template: what tokenizer.chat_template holds (None: edgemm's format);
    tok_fields: tokenizer_fields already converted (None: converted here)."""
    import gguf
    a = DECODER_ARCHS[arch]
    d = model.cfg.decoder
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_name(name)
    w.add_description(a.description.format(arch=arch))
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
    a.keys(w, d)
    tf = tok_fields or tokenizer_fields(tok, d.vocab_size)
    add_tokenizer(w, tok, tf, chat_template)

    dec = model.decoder
    w.add_tensor("token_embd.weight", _np(dec.tok_embeddings.weight))
    w.add_tensor("output_norm.weight", _np(dec.norm.weight))
    if not d.tie_embeddings:
        w.add_tensor("output.weight", _np(dec.lm_head.weight))
    for i, layer in enumerate(dec.layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", _np(layer.attn_norm.weight))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", _np(layer.ffn_norm.weight))
        a.layer(w, i, layer, d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


MMPROJ_WRITERS: dict = {}      # clip.projector_type -> writer (model, path, name, qtype) -> {tensor: type}


def mmproj_writer_for(*projectors: str):
    """Registers the decorated function as the mmproj writer of these clip.projector_type values (as DECODER_ARCHS
    registers a decoder architecture): a new composition's projector is one decorated writer."""
    def put(fn):
        for p in projectors:
            if p in MMPROJ_WRITERS:
                raise ValueError(f"two mmproj writers for projector {p!r}: {MMPROJ_WRITERS[p].__name__}, {fn.__name__}")
            MMPROJ_WRITERS[p] = fn
        return fn
    return put


@mmproj_writer_for("cogvlm")
def write_mmproj_gguf(model, path: Path, name: str, qtype: str) -> dict:
    """ViT + adapter + boi/eoi as llama.cpp's clip/mmproj file, projector cogvlm. -> {tensor: type}."""
    import gguf
    cfg, v = model.cfg, model.cfg.vision
    D = cfg.decoder.d_model
    w = gguf.GGUFWriter(str(path), arch="clip")
    w.add_name(f"{name} vision")
    w.add_description("edgemm vision stage: EVA-style ViT + GLU adapter + boi/eoi (llama.cpp projector cogvlm)")
    w.add_file_type(mmproj_file_type(qtype))
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
        types[n] = add_vision_tensor(w, n, _np(t) if not isinstance(t, np.ndarray) else t, qtype)

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


@mmproj_writer_for("mlp")
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
    w.add_file_type(mmproj_file_type(qtype))
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
        types[n] = add_vision_tensor(w, n, _np(t) if not isinstance(t, np.ndarray) else t, qtype)

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
    clip_block_tensors(put, vt.blocks, v.width, up, down)
    for n, t in llava_projector_tensors(cfg.adapter.kind, pj):
        put(n, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return types


def clip_block_tensors(put, blocks, width: int, up: str = "ffn_up", down: str = "ffn_down") -> None:
    """edgemm's ClipBlocks (fused qkv, proj, ln1, ln2, fc1, fc2; weights and biases) under clip.cpp's names: separate
    v.blk.N.attn_q / attn_k / attn_v, attn_out, ln1, ln2, fc1 as `up`, fc2 as `down`."""
    for i, blk in enumerate(blocks):
        for kind in ("weight", "bias"):
            qkv = _np(getattr(blk.qkv, kind))
            for j, n in enumerate(("attn_q", "attn_k", "attn_v")):
                put(f"v.blk.{i}.{n}.{kind}", qkv[j * width:(j + 1) * width])
            for ours, theirs in (("proj", "attn_out"), ("ln1", "ln1"), ("ln2", "ln2"), ("fc1", up), ("fc2", down)):
                put(f"v.blk.{i}.{theirs}.{kind}", getattr(getattr(blk, ours), kind))


# the mmproj tensor of each projector module (edgemm.blocks.connectors' names), as tools/mtmd/clip.cpp loads them
LLAVA_PROJECTOR_TENSORS = {"mlp": (("mm.0", "linear_1"), ("mm.2", "linear_2")),
                           "mlp_norm": (("mm.0", "linear_1"), ("mm.1", "norm_1"), ("mm.3", "linear_2"),
                                        ("mm.4", "norm_2"))}


def llava_projector_tensors(kind: str, pj) -> list:
    """A LLaVA projector (edgemm.blocks.connectors) -> [(mmproj tensor, array)] as llama.cpp's llava graph
    (tools/mtmd/models/llava.cpp) reads them under projector type `mlp`:
    - mlp: mm.0 -> ggml_gelu -> mm.2, biases added unconditionally (a bias-free projector gets zeros);
    - mlp_norm (Yi-VL; clip.cpp takes `mlp` with an mm.3 tensor as it): mm.0 -> LayerNorm mm.1 -> ggml_gelu -> mm.3 ->
      LayerNorm mm.4, both norms at the vision eps;
    - linear (LLaVA v1): the graph has no plain Linear (`mlp` without mm.2 still applies GELU, and the mmproj's width
      is read from mm.2), so the Linear h = Wx + b goes in as mm.0 = [W; -W], [b; -b] and mm.2 = [I, -I], zero bias:
      GELU(h) - GELU(-h) = h for GELU's erf and tanh forms alike (x Phi(x) + x (1 - Phi(x)); tanh is odd)."""
    def wb(lin):
        w = _np(lin.weight)
        return w, _np(lin.bias) if lin.bias is not None else np.zeros(w.shape[0], np.float32)
    if kind == "linear":
        w, b = wb(pj.linear)
        eye = np.eye(w.shape[0], dtype=np.float32)
        return [("mm.0.weight", np.concatenate([w, -w])), ("mm.0.bias", np.concatenate([b, -b])),
                ("mm.2.weight", np.concatenate([eye, -eye], 1)), ("mm.2.bias", np.zeros(w.shape[0], np.float32))]
    mods = LLAVA_PROJECTOR_TENSORS[kind]
    return [(f"{n}.{k}", a) for n, m in mods for k, a in zip(("weight", "bias"), wb(getattr(pj, m)))]


def llava_projector_state(kind: str, t: dict, bias: bool = True) -> dict:
    """The projector's state dict back from an mmproj's tensors (name -> torch tensor; llava_projector_tensors'
    inverse: the linear form's W and b are mm.0's first half)."""
    if kind == "linear":
        d = t["mm.2.weight"].shape[0]
        return {"linear.weight": t["mm.0.weight"][:d], **({"linear.bias": t["mm.0.bias"][:d]} if bias else {})}
    mods = LLAVA_PROJECTOR_TENSORS[kind]
    return {f"{m}.{k}": t[f"{n}.{k}"] for n, m in mods for k in ("weight", "bias") if k == "weight" or bias}


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
