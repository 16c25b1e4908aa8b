#!/usr/bin/env python
"""What any-resolution tiling costs: a tiny random LLaVA-NeXT (transformers' own classes, LLaVA-v1.6's tile
geometry scaled down: 112 px tiles of 14 px patches = 64 rows, pinpoints 1x2 2x1 2x2 3x1 1x3 tiles) is saved,
imported and exported to an fp32 onnx bundle, then `edgemm bench` compares tile budgets on it in interleaved rounds
(not a test).

    python benchmarks/bench_anyres.py /tmp/llava-next-bench     # then run the printed `edgemm bench` command
"""
from __future__ import annotations

import sys
from pathlib import Path


def make(d: Path) -> Path:
    import torch
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessorPil)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from edgemm.export.onnx import export_onnx
    from edgemm.importers import import_checkpoint
    S = 112
    pins = [[S, 2 * S], [2 * S, S], [2 * S, 2 * S], [3 * S, S], [S, 3 * S]]
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                                       num_attention_heads=4, image_size=S, patch_size=14, projection_dim=64),
        text_config=LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                num_attention_heads=4, max_position_embeddings=2048),
        image_token_index=3, image_grid_pinpoints=pins)
    torch.manual_seed(0)
    src = d / "hf"
    LlavaNextForConditionalGeneration(cfg).eval().save_pretrained(src, safe_serialization=True)
    LlavaNextImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                               image_grid_pinpoints=pins).save_pretrained(src)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<image>": 3, **{f"w{i}": i for i in range(4, 64)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<image>"])
    tok.save(str(src / "tokenizer.json"))
    import_checkpoint(src, d / "ck", force=True, log=None)
    export_onnx(str(d / "ck"), d / "onnx", precision="fp32", force=True, log=None)
    return d / "onnx"


if __name__ == "__main__":
    b = make(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/llava-next-bench"))
    print(f"edgemm bench {b} --backend ort --device cpu --max-tiles 1,default --limit 0 --fidelity-prompts 0 "
          f"--repeats 10 -o {b.parent / 'bench'}")
