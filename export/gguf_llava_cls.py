"""A llama.cpp defect and edgemm's way round it (ggml-org/llama.cpp#25814): llama.cpp's llava graph puts CLIP's
CLS row after the patches while its inputs assume it first, so mtmd's image rows are off for every CLIP-tower LLaVA.
The mmproj is written as llama.cpp's converters write it (correct once that is fixed); the export detects the
defect (mtmd's rows equal the simulated defective rows), records it in the manifest, and edgemm's llamacpp backend
then computes the image rows from the mmproj's weights with the reference code."""
from __future__ import annotations

import numpy as np

CLS_ORDER_WARNING = ("warning: this llama.cpp's llava graph puts CLIP's CLS row after the patches while its inputs "
                     "assume it first (ggml-org/llama.cpp#25814): mtmd's image rows are off for every CLIP-tower "
                     "LLaVA. The mmproj is written as llama.cpp's converters write it (correct once that is fixed); "
                     "edgemm's llamacpp backend computes the image rows from the mmproj's weights with the "
                     "reference code meanwhile")


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


def mtmd_cls_order_defect(model, pixels, rows_mt, max_abs: float, tol: float) -> bool:
    """True when mtmd's LLaVA image rows are off the reference (max_abs > tol) but are the defect's rows
    (llava_rows_cls_last, within tol)."""
    import torch
    if max_abs <= tol:
        return False
    with torch.inference_mode():
        sim = llava_rows_cls_last(model.vision, model.adapter, torch.from_numpy(pixels))[0].numpy()
    return bool(np.max(np.abs(rows_mt - sim)) <= tol)
