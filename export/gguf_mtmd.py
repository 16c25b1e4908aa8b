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
  from the decoder's token_embd."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgemm.export.gguf_quant import add_vision_tensor, mmproj_file_type
from edgemm.export.gguf_tensors import _np, clip_block_tensors


def _clip_header(w, model, name: str, qtype: str, projector: str, description: str) -> None:
    """The keys every mmproj has (MmprojModel.set_gguf_parameters) + the projector type, GELU (tanh form: SigLIP's
    gelu_pytorch_tanh, ggml_gelu) and the tower's LayerNorm eps."""
    v = model.cfg.vision
    w.add_name(f"{name} vision")
    w.add_description(description)
    w.add_type("mmproj")
    w.add_file_type(mmproj_file_type(qtype))
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", projector)
    w.add_bool("clip.use_gelu", True)
    w.add_uint32("clip.vision.projection_dim", model.cfg.decoder.d_model)
    w.add_uint32("clip.vision.image_size", v.image_size)
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
