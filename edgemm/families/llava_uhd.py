"""LLaVA-UHD (thunlp/LLaVA-UHD, branch LLaVA-UHD-v1, the ECCV release with guozonghao96/llava-uhd-144-13b) -> edgemm.

The layout is haotian-liu/LLaVA's (edgemm.families.llava_original: flat Llama config.json with the mm_* keys,
model.* + lm_head, the CLIP tower in its own folder or the checkpoint) with mm_projector_type
"adapt_spatial_resampler": model.mm_projector.{query, pos_embed, kv_proj.weight, attn.in_proj_weight,
attn.in_proj_bias, attn.out_proj.*, ln_q.*, ln_kv.*, ln_post.*, proj} (AdaptSpatialResampler: 144 queries, a 12 x 12
grid, hidden_size // 128 heads, kv_dim mm_hidden_size) -> edgemm.blocks.resampler.UhdResampler (Qwen-VL's resampler
+ the region attention and run-time key positions; proj is x @ proj, stored transposed). The query count is read
from pos_embed's shape. The separators are the token embedding rows of the release's NEWLINE_TOKEN 13 and
DOT_TOKEN 29892 (Vicuna's '\\n' and ','), copied into the connector at import.

The tower is CLIP with its position table interpolated to each slice (AdaptCLIPVisionEmbeddings); the host slices as
edgemm.uhd_slices says (the eval scripts' resize_image_keep_ratio(1024) then slice_image_minicpm(max_slice_nums=7,
scale_resolution=336, patch_size=14)); the chat format is conv_vicuna_v1 (LLaVA's).
"""
from __future__ import annotations

import math

from ..config import AdapterConfig
from ..errors import EdgemmError
from . import register
from .llava_original import _Original, map_llava_original

NEWLINE_TOKEN, DOT_TOKEN = 13, 29892        # llava/slice_process.py (Vicuna's ids)
MAX_SLICES, MAX_SIZE = 7, 1024              # the eval scripts: slice_image_minicpm(max_slice_nums=7), resize to 1024


def map_llava_uhd(hf: dict, src, rules: str = "original"):
    pj, w = "model.mm_projector.", "config.json"
    shape = src.shapes.get(pj + "pos_embed")
    if shape is None or len(shape) != 2 or math.isqrt(int(shape[0])) ** 2 != int(shape[0]):
        raise EdgemmError(f"the checkpoint's {pj}pos_embed is missing or not a square grid of query positions "
                          f"({shape})")
    D, Q = int(_int(hf, "hidden_size")), int(shape[0])
    if D < 128:
        raise EdgemmError(f"{w}: hidden_size {D}: the release's resampler has hidden_size // 128 heads (none here)")
    if max(NEWLINE_TOKEN, DOT_TOKEN) >= _int(hf, "vocab_size"):
        raise EdgemmError(f"{w}: vocab_size {hf['vocab_size']} lacks the release's separator ids {DOT_TOKEN} (',') "
                          f"and {NEWLINE_TOKEN} ('\\n')")
    adapter = AdapterConfig(kind="uhd_resampler", eps=1e-6, query_tokens=Q, resampler_heads=D // 128,
                            marker_ids=[DOT_TOKEN, NEWLINE_TOKEN])

    def projector(plan, cfg):
        v = cfg.vision
        v.tiling, v.max_tiles, v.longest_edge, v.pad_square = "uhd", MAX_SLICES, MAX_SIZE, False
        for ours in ("query", "pos_embed", "attn.in_proj_weight", "attn.in_proj_bias"):
            plan.add(f"adapter.{ours}", pj + ours)
        if v.width != D:
            plan.add("adapter.kv_proj.weight", pj + "kv_proj.weight")
        for m in ("attn.out_proj", "ln_q", "ln_kv", "ln_post"):
            for n in ("weight", "bias"):
                plan.add(f"adapter.{m}.{n}", f"{pj}{m}.{n}")
        plan.add("adapter.proj.weight", pj + "proj", fn=lambda ts: ts[0].t().contiguous())
        plan.add("adapter.separators", "model.embed_tokens.weight",
                 fn=lambda ts: ts[0][[DOT_TOKEN, NEWLINE_TOKEN]].clone())
        plan.notes.append(f"LLaVA-UHD: up to {MAX_SLICES} slices + the source image, {Q} resampled rows each "
                          f"({adapter.resampler_heads} heads, region attention), ',' / '\\n' rows between slices; "
                          "the image's rows replace the prompt's <image>")
    return map_llava_original(hf, src, rules, adapter, projector)


def _int(hf: dict, key: str) -> int:
    x = hf.get(key)
    if not isinstance(x, int) or x < 1:
        raise EdgemmError(f"config.json: {key} must be a positive integer, not {x!r}")
    return x


@register
class LlavaUhd(_Original):
    name = "llava_uhd"
    projector_type = "adapt_spatial_resampler"
    source = "thunlp/LLaVA-UHD's layout (`LlavaLlamaForCausalLM`, `adapt_spatial_resampler`)"
    computes = ("variable-size slices by aspect ratio (up to 7 + the source image), a shared region-attention "
                "resampler (144 rows a slice), comma / newline rows between slices")
    blocks = ("vision:clip", "connector:uhd_resampler", "layer:single")
    core = ("single branch (llava)", "clip vision tower",
            "variable-size slices + spatially constrained resampler (llava-uhd)")

    def plan(self, hf, src, rules="original"):
        return map_llava_uhd(hf, src, rules)
