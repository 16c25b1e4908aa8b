"""Specs of edgemm.blocks.llamavid (LLaMA-VID): LAVIS's EVA ViT-g tower (vision "eva_lavis": BLIP's tower without
its final norm) and the llamavid connector (a frame's context token from the Q-Former's question-conditioned
queries, then pool_tokens content rows: 1 for compress_type 'mean', g^2 for 'grid:g'). The Q-Former's fields are
the qformer spec's (qformer_text: the question's tokens join the queries, as InstructBLIP's)."""
from __future__ import annotations

import math

from ...errors import EdgemmError
from ..spec import declare
from . import qformer
from .vision import eva_params


def check(cfg) -> None:
    v, a = cfg.vision, cfg.adapter
    if v.arch != "eva_lavis" or cfg.adapter.kind != "llamavid":
        raise EdgemmError("vision arch 'eva_lavis' goes with adapter kind 'llamavid' (LLaMA-VID) and only with it")
    side, g = v.image_size // v.patch_size, math.isqrt(max(a.pool_tokens, 0))
    if not (a.qformer_text and a.pool_tokens >= 1 and g * g == a.pool_tokens and side % g == 0 and v.n_patches % 2 == 0):
        raise EdgemmError("the llamavid connector needs its Q-Former reading the question (qformer_text), an even "
                          "patch count (the release drops the CLS row of an odd row count) and pool_tokens a square "
                          "whose side divides the patch grid's")
    qformer.check(cfg)


def params(cfg) -> int:
    """The Q-Former projecting to the tower's width (vlm_att_projector), vlm_att_ln, the key and value projectors,
    mm_projector (mlp2x_gelu)."""
    W, D, Q = cfg.vision.width, cfg.decoder.d_model, cfg.adapter.qformer_width
    return qformer.params(cfg) - (Q * D + D) + (Q * W + W) + 2 * W + (W * W + W) + (W * D + D) + (W * D + D) + (D * D + D)


def describe(cfg) -> str:
    v, a = cfg.vision, cfg.adapter
    return (f"vision: EVA ViT (LAVIS) {v.image_size}px/{v.patch_size} width {v.width} x {v.layers} layers -> per frame "
            f"1 context row ({a.query_tokens} Q-Former queries read with the question) + {a.pool_tokens} pooled "
            f"content row(s) = {cfg.n_image_rows} rows (clips: one frame a second)")


declare("vision", "eva_lavis", check=check, params=eva_params)
declare("connector", "llamavid", fields={**qformer.FIELDS, "pool_tokens": 0}, check=check,
        rows=lambda cfg: 1 + cfg.adapter.pool_tokens, params=params, describe=describe)
