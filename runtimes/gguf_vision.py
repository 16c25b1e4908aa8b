"""Vision stages of GGUF bundles that do not run in llama.cpp's mtmd: OnnxVision (a bundle's ONNX vision stage in
ONNX Runtime beside llama.cpp), and the reference ViT + adapter loaded from an mmproj's own tensors
(reference_vision_from_mmproj: pixels mtmd cannot take, and the exporter's validation); pixels_to_rgb tells which."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgemm.errors import EdgemmError


class OnnxVision:
    """A gguf bundle's ONNX vision stage on ONNX Runtime's CPU provider, beside llama.cpp in one process: intra-op
    threads bounded to the backend's, one inter-op thread, and spinning off (session.intra_op.allow_spinning 0):
    after an image ONNX Runtime's workers sleep instead of spinning on the cores llama.cpp's threads decode on."""

    def __init__(self, source, cfg, threads: int, name: str = "vision.onnx", spec: dict | None = None):
        """source: the graph's bytes (hashed as read: edgemm.bundle.stage_sources) or path."""
        import onnxruntime as ort
        self.cfg = cfg
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, int(threads))
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "0")
        so.log_severity_level = 3
        self.options = so
        try:
            self.sess = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
        except Exception as e:               # a graph ONNX Runtime cannot parse or run: one line, no traceback
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise EdgemmError(f"ONNX Runtime could not load the vision stage {name} ({why}); re-export the bundle") \
                from None
        if spec is not None:
            from .ort_backend import OrtBackend
            OrtBackend._check_io(name, "vision", spec, self.sess)

    def rows(self, pixels, *instruction) -> np.ndarray:
        from .base import vision_feeds
        return self.sess.run(["image_rows"], vision_feeds(self.cfg, pixels, instruction))[0]


def pixels_to_rgb(pixels: np.ndarray, vision_cfg) -> np.ndarray | None:
    """Invert edgemm's normalisation: pixels [1, 3, S, S] -> uint8 [S, S, 3], or None when the pixels are not
    exactly an 8-bit image (then mtmd, which takes 8-bit images, cannot reproduce them)."""
    x = np.asarray(pixels, np.float32)
    if x.ndim != 4 or x.shape[0] != 1 or x.shape[1] != 3:
        return None
    mean = np.asarray(vision_cfg.image_mean, np.float32)[:, None, None]
    std = np.asarray(vision_cfg.image_std, np.float32)[:, None, None]
    v = (x[0] * std + mean) * 255.0
    u8 = np.clip(np.rint(v), 0, 255).astype(np.uint8)
    back = (u8.astype(np.float32) / 255.0 - mean) / std
    if np.max(np.abs(back - x[0])) > 1e-5:
        return None
    return np.ascontiguousarray(u8.transpose(1, 2, 0))


def _llava_vision_from_tensors(t: dict, cfg):
    """edgemm's ClipVisionTower + LLaVA projector from the tensors of an mlp-projector mmproj (export/gguf_tensors.py's
    write_llava_mmproj_gguf)."""
    import torch
    from edgemm.blocks import registry
    from edgemm.model import ClipVisionTower
    v = cfg.vision
    tower, proj = ClipVisionTower(v), registry.get("connector", cfg.adapter.kind).from_config(cfg)
    sd = {"patch_embed.weight": t["v.patch_embd.weight"].reshape(v.width, 3, v.patch_size, v.patch_size),
          "cls": t["v.class_embd"].reshape(1, 1, v.width),
          "pos": t["v.position_embd.weight"].reshape(1, v.n_patches + 1, v.width),
          "pre_norm.weight": t["v.pre_ln.weight"], "pre_norm.bias": t["v.pre_ln.bias"]}
    up, down = ("ffn_down", "ffn_up") if v.mlp_dim == v.width else ("ffn_up", "ffn_down")   # as written
    for i in range(len(tower.blocks)):
        b = f"v.blk.{i}."
        for kind in ("weight", "bias"):
            sd[f"blocks.{i}.qkv.{kind}"] = torch.cat([t[f"{b}attn_{n}.{kind}"] for n in "qkv"])
            for ours, theirs in (("proj", "attn_out"), ("ln1", "ln1"), ("ln2", "ln2"), ("fc1", up), ("fc2", down)):
                sd[f"blocks.{i}.{ours}.{kind}"] = t[f"{b}{theirs}.{kind}"]
    tower.load_state_dict(sd)
    from edgemm.export.gguf_tensors import llava_projector_state
    psd = llava_projector_state(cfg.adapter.kind, t, cfg.adapter.bias)
    if cfg.adapter.image_newline:
        psd["image_newline"] = t["model.image_newline"]
    proj.load_state_dict(psd)
    return tower.eval(), proj.eval()


def _idefics3_vision_from_tensors(t: dict, cfg, markers):
    """edgemm's SigLIP tower + pixel_shuffle_linear connector from an idefics3 mmproj (export/gguf_mtmd.py), the
    connector's marker rows from the decoder's token_embd."""
    import torch
    from edgemm.blocks import registry
    v = cfg.vision
    tower = registry.get("vision", "siglip").from_config(cfg)
    proj = registry.get("connector", "pixel_shuffle_linear").from_config(cfg)
    sd = {"patch_embed.weight": t["v.patch_embd.weight"].reshape(v.width, 3, v.patch_size, v.patch_size),
          "patch_embed.bias": t["v.patch_embd.bias"], "pos": t["v.position_embd.weight"].reshape(1, v.n_patches, -1),
          "post_norm.weight": t["v.post_ln.weight"], "post_norm.bias": t["v.post_ln.bias"]}
    for i in range(len(tower.blocks)):
        b = f"v.blk.{i}."
        for kind in ("weight", "bias"):
            sd[f"blocks.{i}.qkv.{kind}"] = torch.cat([t[f"{b}attn_{n}.{kind}"] for n in "qkv"])
            for ours, theirs in (("proj", "attn_out"), ("ln1", "ln1"), ("ln2", "ln2"), ("fc1", "ffn_up"),
                                 ("fc2", "ffn_down")):
                sd[f"blocks.{i}.{ours}.{kind}"] = t[f"{b}{theirs}.{kind}"]
    tower.load_state_dict(sd)
    proj.load_state_dict({"proj.weight": t["mm.model.fc.weight"], "markers": torch.from_numpy(np.asarray(markers))})
    return tower.eval(), proj.eval()


def reference_vision_from_mmproj(mmproj: str | Path, cfg, markers=None):
    """The reference ViT + adapter (edgemm.model) loaded with the mmproj's own weights (dequantized). markers: the
    decoder's token rows of adapter.marker_ids (SmolVLM's connector table; LlamaRunner.token_rows)."""
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from edgemm.model import Adapter, VisionTower
    from edgemm.blocks.support import mtmd_graph
    graph = mtmd_graph(cfg.variants())
    if graph not in (None, "idefics3"):
        raise EdgemmError(f"this bundle's vision stage runs in llama.cpp's mtmd only (projector {graph}), which "
                          "takes 8-bit RGB images; these pixels are not one")
    v, d = cfg.vision, cfg.decoder
    r = GGUFReader(str(mmproj))
    t = {}
    for ten in r.tensors:
        a = dequantize(ten.data, ten.tensor_type).astype(np.float32)
        t[ten.name] = torch.from_numpy(np.ascontiguousarray(a.reshape([int(s) for s in reversed(ten.shape)])))
    if cfg.adapter.kind in ("mlp", "linear", "mlp_norm"):     # LLaVA's projectors (gguf_tensors.py)
        return _llava_vision_from_tensors(t, cfg)
    if graph == "idefics3":
        return _idefics3_vision_from_tensors(t, cfg, markers)
    tower, adapter = VisionTower(v), Adapter(cfg.adapter, v.width, d.d_model)
    sd = {"patch_embed.weight": t["v.patch_embd.weight"].reshape(v.width, 3, v.patch_size, v.patch_size),
          "patch_embed.bias": t["v.patch_embd.bias"],
          "cls": t["v.class_embd"].reshape(1, 1, v.width),
          "pos": t["v.position_embd.weight"].reshape(1, v.n_patches + 1, v.width)}
    names = {"qkv": "attn_qkv", "proj": "attn_out", "ln1": "ln1", "fc1": "ffn_up", "fc2": "ffn_down", "ln2": "ln2"}
    for i in range(v.layers):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                sd[f"blocks.{i}.{ours}.{kind}"] = t[f"v.blk.{i}.{theirs}.{kind}"]
    tower.load_state_dict(sd)
    adapter.load_state_dict({"linear_proj.weight": t["mm.model.fc.weight"],
                             "norm.weight": t["mm.post_fc_norm.weight"], "norm.bias": t["mm.post_fc_norm.bias"],
                             "gate.weight": t["mm.gate.weight"], "up.weight": t["mm.up.weight"],
                             "down.weight": t["mm.down.weight"],
                             "boi": t["v.boi"].reshape(1, 1, -1), "eoi": t["v.eoi"].reshape(1, 1, -1)})
    return tower.eval(), adapter.eval()
