"""mmproj files for the compositions llama.cpp's mtmd computes with a projector of their own (edgemm.blocks.support
MTMD_GRAPHS), written as the vendored llama.cpp's converter writes them (conversion/gemma.py Gemma3VisionModel,
MmprojModel.set_gguf_parameters) and read by its tools/mtmd/clip.cpp:

- gemma3: a SigLIP tower (models/siglip.cpp: no CLS, no pre-norm, post_ln) and projector `gemma3`: the patch grid
  average-pooled by clip.vision.projector.scale_factor (written where it is not the released 4), then
  mm.soft_emb_norm (RMSNorm at the tower's eps; the (1 + w) already folded in) and mm.input_projection
  ([W, D] as transformers stores it). The image segment's boi / eoi are not in the mmproj: llama.cpp puts the
  <start_of_image> / <end_of_image> tokens around the rows (mtmd.cpp), and edgemm's llamacpp backend reads their
  rows from the decoder's token_embd (LlamaRunner.token_rows);
- idefics3 (SmolVLM / Idefics3, conversion/smolvlm.py SmolVLMModel): the SigLIP tower, each tile's patch grid
  pixel-shuffled by clip.vision.projector.scale_factor (1 / downsample_ratio), mm.model.fc (no bias);
  clip.vision.preproc_image_size is the processor's longest_edge. The tile markers are text tokens to llama.cpp
  (mtmd.cpp's idefics3 slice template); edgemm's llamacpp backend runs mtmd tile by tile and takes the marker rows
  from the decoder's token_embd;
- qwen2vl_merger / qwen2.5vl_merger (Qwen2-VL / Qwen2.5-VL, conversion/qwenvl.py Qwen2VLVisionModel;
  tools/mtmd/models/qwen2vl.cpp):
  the Conv3d patch embedding as two Conv2d kernels v.patch_embd.weight / .weight.1 (one per frame, from the kept
  kernel; a checkpoint imported with the sum only gives each half: an image is one frame repeated, so mtmd's image
  rows are the same), no patch bias, no position table (2-D M-RoPE in
  the graph), blocks ln1 / attn_q,k,v / attn_out / ln2 / ffn_up, ffn_down (+ ffn_gate: 2.5's SwiGLU, clip.use_silu;
  2-VL's QuickGELU is clip.cpp's default FFN op), the merger's ln_q as v.post_ln and its two Linears as mm.0 /
  mm.2. 2.5's window attention is clip.vision.n_wa_pattern (every n-th block full; clip.cpp's windows are 112 px).
  The image's rows come back in the merged grid's row-major order (clip.cpp undoes its window grouping);
  <|vision_start|> / <|vision_end|> are text tokens that mtmd puts around them."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgemm.export.gguf_quant import add_vision_tensor, mmproj_file_type
from edgemm.export.gguf_tensors import _np, clip_block_tensors, mmproj_writer_for


def _clip_header(w, model, name: str, qtype: str, projector: str, description: str, ffn: str = "gelu",
                 image_size: int | None = None) -> None:
    """The keys every mmproj has (MmprojModel.set_gguf_parameters) + the projector type, the tower's FFN activation
    (ffn: "gelu", the tanh form: SigLIP's gelu_pytorch_tanh, ggml_gelu; "silu": clip.use_silu; "quick": neither key,
    clip.cpp's GELU_QUICK) and the tower's LayerNorm eps."""
    v = model.cfg.vision
    w.add_name(f"{name} vision")
    w.add_description(description)
    w.add_type("mmproj")
    w.add_file_type(mmproj_file_type(qtype))
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", projector)
    if ffn in ("gelu", "silu"):
        w.add_bool(f"clip.use_{ffn}", True)
    w.add_uint32("clip.vision.projection_dim", model.cfg.decoder.d_model)
    w.add_uint32("clip.vision.image_size", image_size or v.image_size)
    w.add_uint32("clip.vision.patch_size", v.patch_size)
    w.add_uint32("clip.vision.embedding_length", v.width)
    w.add_uint32("clip.vision.feed_forward_length", v.mlp_dim)
    w.add_uint32("clip.vision.block_count", len(model.vision.blocks))
    w.add_uint32("clip.vision.attention.head_count", v.heads)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", v.eps)
    w.add_array("clip.vision.image_mean", [float(x) for x in v.image_mean])
    w.add_array("clip.vision.image_std", [float(x) for x in v.image_std])


def _siglip_tensors(put, vt, v) -> None:
    """edgemm's SigLIP tower (blocks/vision.py SiglipVisionTower) under clip.cpp's names: patch conv + bias, one
    position row per patch, separate attn_q/k/v, ffn_up = fc1, post_ln."""
    put("v.patch_embd.weight", vt.patch_embed.weight, "f32")
    put("v.patch_embd.bias", vt.patch_embed.bias)
    put("v.position_embd.weight", _np(vt.pos).reshape(v.n_patches, v.width), "f32")
    clip_block_tensors(put, vt.blocks, v.width)
    if hasattr(vt, "post_norm"):
        put("v.post_ln.weight", vt.post_norm.weight)
        put("v.post_ln.bias", vt.post_norm.bias)


def _writer(path: Path, qtype: str):
    """-> (GGUFWriter, put(name, tensor, force_type=None), types): put adds one tensor at qtype (add_vision_tensor's
    rule) or at the type the converter forces for it."""
    import gguf
    w = gguf.GGUFWriter(str(path), arch="clip")
    types: dict[str, str] = {}

    def put(n, t, force: str | None = None):
        a = t if isinstance(t, np.ndarray) else _np(t)
        types[n] = add_vision_tensor(w, n, a, force if force and qtype != "f32" else qtype)
    return w, put, types


def _close(w) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gemma3_scale_factor(cfg) -> int:
    """The pooling kernel clip.cpp's gemma3 graph uses: patches per side / rows per side (the converter's
    proj_scale_factor)."""
    side = cfg.vision.image_size // cfg.vision.patch_size
    return side // round(cfg.adapter.pool_tokens ** 0.5)


@mmproj_writer_for("gemma3")
def write_gemma3_mmproj(model, path: Path, name: str, qtype: str) -> dict:
    """Gemma 3's SigLIP tower + projector as llama.cpp's clip/mmproj file, projector gemma3. -> {tensor: type}.
    Quantized files keep mm.input_projection at f16 and the embeddings at f32, as the converter forces them
    (ggml-org/llama.cpp#13025)."""
    w, put, types = _writer(path, qtype)
    _clip_header(w, model, name, qtype, "gemma3", "edgemm vision stage: SigLIP ViT + Gemma 3 projector "
                 "(llama.cpp projector gemma3)")
    k = gemma3_scale_factor(model.cfg)
    if k != 4:                                  # the converter writes it only where it is not the released 4
        w.add_uint32("clip.vision.projector.scale_factor", k)
    _siglip_tensors(put, model.vision, model.cfg.vision)
    ad = model.adapter
    put("mm.soft_emb_norm.weight", ad.norm.weight)
    put("mm.input_projection.weight", _np(ad.proj.weight).T.copy(), "f16")        # [W, D], transformers' layout
    _close(w)
    return types


@mmproj_writer_for("idefics3")
def write_idefics3_mmproj(model, path: Path, name: str, qtype: str) -> dict:
    """SmolVLM's / Idefics3's SigLIP tower + pixel-shuffle Linear as llama.cpp's clip/mmproj file, projector idefics3.
    -> {tensor: type}. The connector's marker rows are token embeddings: not in the mmproj."""
    w, put, types = _writer(path, qtype)
    _clip_header(w, model, name, qtype, "idefics3", "edgemm vision stage: SigLIP ViT + Idefics3 pixel-shuffle "
                 "connector (llama.cpp projector idefics3)")
    v, a = model.cfg.vision, model.cfg.adapter
    w.add_uint32("clip.vision.projector.scale_factor", round(1 / a.downsample_ratio))
    w.add_uint32("clip.vision.preproc_image_size", v.longest_edge or v.image_size)
    _siglip_tensors(put, model.vision, v)
    put("mm.model.fc.weight", model.adapter.proj.weight)
    _close(w)
    return types


QWEN25_WINDOW_PX = 112          # clip.cpp's qwen2.5vl windows (attn_window_size 0 -> 112; no key read for it)


def qwen2vl_projector(cfg) -> str:
    """clip.projector_type of a Qwen2-VL (qwen2vl) or Qwen2.5-VL (RMSNorm + SwiGLU tower: qwen2.5vl_merger) mmproj."""
    return "qwen2.5vl_merger" if cfg.vision.mlp == "swiglu" else "qwen2vl_merger"


def qwen2vl_window_pattern(v) -> int:
    """clip.vision.n_wa_pattern: blocks n-1, 2n-1, ... attend fully, the others in windows (the converter's
    fullatt_block_indexes[0] + 1); 0 without window attention. Raises where clip.cpp's pattern cannot say it."""
    from edgemm.errors import EdgemmError
    if not v.window_px:
        return 0
    full = sorted(v.full_blocks)
    n = full[0] + 1 if full else 0
    if not n or full != list(range(n - 1, v.layers, n)):
        raise EdgemmError(f"Qwen2.5-VL full-attention blocks {full}: llama.cpp's qwen2.5vl_merger mmproj takes "
                          "every n-th block (clip.vision.n_wa_pattern), as the released models have them")
    return n


@mmproj_writer_for("qwen2vl_merger", "qwen2.5vl_merger")
def write_qwen2vl_mmproj(model, path: Path, name: str, qtype: str) -> dict:
    """Qwen2-VL's / Qwen2.5-VL's tower + patch merger as llama.cpp's clip/mmproj file, projector qwen2vl_merger /
    qwen2.5vl_merger (module docstring). -> {tensor: type}."""
    cfg, v = model.cfg, model.cfg.vision
    v25 = qwen2vl_projector(cfg) == "qwen2.5vl_merger"
    w, put, types = _writer(path, qtype)
    _clip_header(w, model, name, qtype, qwen2vl_projector(cfg), "edgemm vision stage: Qwen2-VL ViT + 2x2 patch "
                 f"merger (llama.cpp projector {qwen2vl_projector(cfg)})", ffn="silu" if v25 else "quick",
                 image_size=560)                        # (the converter's default: the warmup size only)
    w.add_uint32("clip.vision.spatial_merge_size", v.merge_size)
    if v25:
        w.add_uint32("clip.vision.n_wa_pattern", qwen2vl_window_pattern(v))
    vt, ad = model.vision, model.adapter
    if hasattr(vt, "patch_embed_t") and vt.patch_embed_t.in_channels == 6:     # the Conv3d's own two kernels
        k = _np(vt.patch_embed_t.weight)
        put("v.patch_embd.weight", np.ascontiguousarray(k[:, :3]), "f32")
        put("v.patch_embd.weight.1", np.ascontiguousarray(k[:, 3:]), "f32")
    else:                                       # (a checkpoint imported before edgemm kept them: exact halves)
        half = _np(vt.patch_embed.weight) * np.float32(0.5)
        put("v.patch_embd.weight", half, "f32")
        put("v.patch_embd.weight.1", half.copy(), "f32")
    # clip.cpp swaps ffn_up / ffn_down of qwen2vl files whose ffn_down has n_embd inputs (legacy naming); with
    # mlp_dim == width it cannot tell, so write that order then
    up, down = ("ffn_down", "ffn_up") if v.mlp_dim == v.width else ("ffn_up", "ffn_down")
    mlp = (("gate", "ffn_gate"), ("up", up), ("down", down)) if v25 else (("fc1", up), ("fc2", down))
    kinds = ("weight",) if v25 else ("weight", "bias")                  # 2.5: RMSNorm
    for i, blk in enumerate(vt.blocks):
        b = f"v.blk.{i}."
        for kind in ("weight", "bias"):
            qkv = _np(getattr(blk.qkv, kind))
            for j, n in enumerate(("attn_q", "attn_k", "attn_v")):
                put(f"{b}{n}.{kind}", qkv[j * v.width:(j + 1) * v.width])
            put(f"{b}attn_out.{kind}", getattr(blk.proj, kind))
            for ours, theirs in mlp:
                put(f"{b}{theirs}.{kind}", getattr(getattr(blk, ours), kind))
        for kind in kinds:
            put(f"{b}ln1.{kind}", getattr(blk.norm1, kind))
            put(f"{b}ln2.{kind}", getattr(blk.norm2, kind))
    for kind in kinds:
        put(f"v.post_ln.{kind}", getattr(ad.ln_q, kind))
    for kind in ("weight", "bias"):
        put(f"mm.0.{kind}", getattr(ad.fc1, kind))
        put(f"mm.2.{kind}", getattr(ad.fc2, kind))
    _close(w)
    return types


def write_internvl_mmproj(model, path: Path, name: str, qtype: str) -> dict:
    """InternVL's InternViT tower + pixel-shuffle projector as llama.cpp's clip/mmproj file, projector internvl, as
    the vendored converter's InternVisionModel writes it (conversion/internvl.py): use_gelu for InternViT's "gelu",
    the class and position embeddings as transformers stores them (CLS first), q/k/v split, ls1 / ls2
    (lambda_1 / lambda_2), the projector's LayerNorm and two Linears as mm.model.mlp.0 / .1 / .3. -> {tensor: type}.
    Not used by the exporter: llama.cpp's internvl graph (tools/mtmd/models/internvl.cpp) appends CLS after the
    patches but adds the position rows in CLS-first order, and computes the tanh GELU (tests/test_internvl_gguf.py
    measures it)."""
    cfg, v = model.cfg, model.cfg.vision
    w, put, types = _writer(path, qtype)
    _clip_header(w, model, name, qtype, "internvl", "edgemm vision stage: InternViT + pixel-shuffle MLP projector "
                 "(llama.cpp projector internvl)")
    w.add_uint32("clip.vision.projector.scale_factor", round(1 / cfg.adapter.downsample_ratio))
    vt, ad = model.vision, model.adapter
    put("v.patch_embd.weight", vt.patch_embed.weight, "f32")
    put("v.patch_embd.bias", vt.patch_embed.bias)
    put("v.class_embd", _np(vt.cls).reshape(1, v.width))
    put("v.position_embd.weight", _np(vt.pos).reshape(v.n_patches + 1, v.width), "f32")
    for i, blk in enumerate(vt.blocks):
        b = f"v.blk.{i}."
        for kind in ("weight", "bias"):
            t = getattr(blk.qkv, kind)
            if t is not None:
                qkv = _np(t)
                for j, n in enumerate(("attn_q", "attn_k", "attn_v")):
                    put(f"{b}{n}.{kind}", qkv[j * v.width:(j + 1) * v.width])
            for ours, theirs in (("proj", "attn_out"), ("ln1", "ln1"), ("ln2", "ln2"), ("fc1", "ffn_up"),
                                 ("fc2", "ffn_down")):
                t = getattr(getattr(blk, ours), kind, None)
                if t is not None:
                    put(f"{b}{theirs}.{kind}", t)
        if "q_norm" in blk._modules:
            put(f"{b}attn_q_norm.weight", blk.q_norm.weight)
            put(f"{b}attn_k_norm.weight", blk.k_norm.weight)
        put(f"{b}ls1.weight", blk.ls1)
        put(f"{b}ls2.weight", blk.ls2)
    if "final_norm" in vt._modules:
        put("v.post_ln.weight", vt.final_norm.weight)
        put("v.post_ln.bias", vt.final_norm.bias)
    for j, mod in ((0, ad.layer_norm), (1, ad.linear_1), (3, ad.linear_2)):
        for kind in ("weight", "bias"):
            put(f"mm.model.mlp.{j}.{kind}", getattr(mod, kind))
    _close(w)
    return types
