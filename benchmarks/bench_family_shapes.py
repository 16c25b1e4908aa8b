#!/usr/bin/env python
"""`edgemm bench` on a bench-sized, random-weight instance of a family's real shapes (issue 30; not a test).

    python benchmarks/bench_family_shapes.py --family smolvlm --out runs/family-smolvlm --precisions fp32,int8,int4

Builds a checkpoint in the transformers layout with the preset's shapes (random weights, a small byte-level
tokenizer carrying the family's special tokens; the embedding keeps the real vocabulary's row count), imports it
with `edgemm import`, exports onnx at each precision (default calibration) and runs `edgemm bench --limit 0
--fidelity-prompts 0` (random weights: no accuracy, no fidelity) over the bundles. Prints one table (vision ms, TTFT
ms, decode tok/s, peak RSS MiB per precision) and writes OUT/family_shapes.json (plus bench's own OUT/bench/).

Presets (SHAPES) hold the real configs' fields; add a family with its config builder (BUILDERS). `--family qwen2vl`
is Qwen2-VL-2B's shapes with 4 of its 28 decoder layers; `--family qwen2vl-tiny --precisions fp32,int8 --repeats 2`
checks the builder (the bench's image: 4 rows). SmolVLM runs with
do_image_splitting off and the first resize's longest edge at the tile size (512): every image is one 512 x 512 tile,
64 image rows (the released processor splits into up to 4 x 4 tiles + the whole image).

Measured (2026-12-03, the command above, 2-core AMD EPYC without VNNI, onnxruntime 1.32, --threads 2; 67 image rows:
the tile's 64 + its markers; int8 runs as u8u8 here):

    precision   vision ms    TTFT ms  decode tok/s  peak RSS MiB  size MB
    fp32           3019.8     3536.7          20.0          3794     1568
    int8           1104.5     1259.2         108.2          1750      488
    int4           2743.0     3421.6          65.1          1257      329

LLaVA-OneVision-0.5B's shapes (2026-12-03, `--family llava_onevision --precisions fp32,int4 --repeats 3`, same
machine, HEAVILY LOADED by other agents' jobs: load average 5-10 on the 2 cores, so every figure is inflated and the
int4 / fp32 ratio is not trustworthy; 1485 image rows: the base image's 729 + one 384 px tile's 27 x 28 with
newline rows; export with --max-tiles 1):

    precision   vision ms    TTFT ms  decode tok/s  peak RSS MiB  size MB
    fp32          22940.4    40593.4           3.8          7848     6108
    int4          52389.6   113152.9           3.4          3588     1305

Issue 29's designs (2026-12-03, each preset's `sweep`: `edgemm bench --images ...` / `--frames ...`, a row per image
size or frame count; "vision in": the slices / frames / images the vision stage took; random weights; REDUCED
decoders, so TTFT and decode tok/s are not the released models' (see each preset). The machine was HEAVILY LOADED:
load average 8-12 on the 2 cores from other agents and these runs themselves (two or three at once), bench's
bandwidth probe read 2.0 GB/s (17 GB/s idle): every figure is inflated, int8 slower than fp32 is the load and
the AVX2-only u8u8 path, not a property of the design).

    python benchmarks/bench_family_shapes.py --family fuyu --precisions fp32,int8 --calib-items 4 --repeats 2 \
        --warmup 1 --decode-steps 16        # peak RSS of any step 5.5 GiB (the fp32 bench), 33 min in all

    precision   input      vision in  image rows  vision ms    TTFT ms  decode tok/s  peak RSS MiB  size MB
    fp32        300x300            1         110       91.0     1771.2           6.1          5220     2058
    fp32        640x480            1         368      285.2     5071.8           5.5          5220     2058
    fp32        1024x768           1         936      837.8    14493.0           4.2          5220     2058
    fp32        1920x1080          1        2340     2674.6    48907.8           4.3          5220     2058
    int8        300x300            1         110      236.8     3503.1           4.7          2496      616
    int8        640x480            1         368      663.4     8447.3           4.1          2496      616
    int8        1024x768           1         936     1544.2    23127.3           4.1          2496      616
    int8        1920x1080          1        2340     4484.8    63397.4           3.9          2496      616

    python benchmarks/bench_family_shapes.py --family llava_uhd --precisions fp32,int8 --calib-items 2 --repeats 1 \
        --warmup 0 --decode-steps 16        # peak RSS 7.6 GiB (an export); the exports took 10 and 28 min, the bench
                                            # was rerun alone (load 4 -> 1) as `edgemm bench` with the same arguments
    precision   input      vision in  image rows  vision ms    TTFT ms  decode tok/s  peak RSS MiB  size MB
    fp32        4000x200           1         144     6611.5     7374.8          13.0          6821     2859
    fp32        1008x336           4         579    25378.0    27575.4          16.9          6821     2859
    fp32        336x336            7        1014    26436.3    28108.3          27.6          6821     2859
    int8        4000x200           1         144     3155.0     3537.3          78.3          3137      961
    int8        1008x336           4         579    12214.0    14021.2          24.4          3137      961
    int8        336x336            7        1014    34965.6    37613.0          27.0          3137      961

    python benchmarks/bench_family_shapes.py --family llamavid --precisions fp32,int8 --calib-items 2 --repeats 1 \
        --warmup 0 --decode-steps 16        # peak RSS of any step 7.0 GiB (an export), 35 min in all; EVA 8 of 39 layers

    precision   input      vision in  image rows  vision ms    TTFT ms  decode tok/s  peak RSS MiB  size MB
    fp32        1 frame            1           2    10318.2    10990.1          10.7          5094     2092
    fp32        4 frames           4           8    31477.1    32536.6           8.3          5094     2092
    fp32        16 frames         16          32   109359.2   110080.6          20.1          5094     2092
    int8        1 frame            1           2     2857.2     3193.4          37.6          2345      632
    int8        4 frames           4           8    11788.1    12220.4          35.1          2345      632
    int8        16 frames         16          32    50838.4    51388.6          20.5          2345      632

    python benchmarks/bench_family_shapes.py --family llava_next_video --precisions fp32 --calib-items 2 \
        --repeats 1 --warmup 0 --decode-steps 16 --sweep "--frames 1,4"   # peak RSS 7.0 GiB, 27 min (int8: below)
    precision   input      vision in  image rows  vision ms    TTFT ms  decode tok/s  peak RSS MiB  size MB
    fp32        1 frame            1         144    25105.9    26140.4           8.9          7130     2946
    fp32        4 frames           4         576   103362.6   105953.5           9.5          7130     2946

LLaVA-NeXT-Video at int8, its video stage quantized too (2026-12-03, rerun on a 2-core AMD EPYC Zen 4 with AVX-512
VNNI, alone and quiet: not comparable with the loaded run above; `--family llava_next_video --precisions fp32,int8
--calib-items 5 --repeats 1 --warmup 0 --decode-steps 16 --sweep "--frames 1,4"`; the int8 export's check: video
stage cosine 0.99972 on held-out frames; 16 decode steps: decode tok/s is noise):

    precision   input      vision in  image rows  vision ms    TTFT ms  decode tok/s  peak RSS MiB  size MB
    fp32        1 frame            1         144     1233.0     1322.6         127.2          7126     2946
    fp32        4 frames           4         576     4934.8     5136.7         213.0          7126     2946
    int8        1 frame            1         144      387.8      435.2         333.4          2389      849
    int8        4 frames           4         576     1977.4     2076.3         370.9          2389      849

InternVL3-1B's shapes (2026-12-03, `--family internvl --precisions fp32,int8 --calib-items 9 --repeats 3`, the
exports at load 5-9 beside other jobs, the bench alone at load 1.4-1.7; one 448 px tile: 256 image rows; 802 M
parameters with the tied 151674-row embedding):

    precision   vision ms    TTFT ms  decode tok/s  peak RSS MiB  size MB
    fp32           6830.4     8876.9          10.1          7005     5744
    int8           4689.1     5983.3          23.2          5892     1868

(int4 stopped that export: `--precision int4 --calib` means int4-awq-gptq, whose Hessians are kept for layers of at
most 4096 inputs, and Qwen2.5-0.5B's FFN down has 4864; such layers now fall back to int4-awq.) int4, rerun
2026-12-03 on another machine (2-core AMD EPYC Zen 4 with AVX-512 VNNI: not comparable with the rows above), alone
and quiet, `--family internvl --precisions int4 --calib-items 9 --repeats 2 --warmup 1` (24 FFN-down layers AWQ
without GPTQ, the vision stage and the image rows' prefill int8-dyn):

    precision   vision ms    TTFT ms  decode tok/s  peak RSS MiB  size MB
    int4           1293.8     1637.3         112.0          4214     1634

SmolVLM2-256M-Video's shapes (2026-12-03, `--family smolvlm_video --precisions fp32,int8,int4 --calib-items 9
--repeats 2 --warmup 1`, the exports loaded, the bench alone at load 1.7-2.1; a frame a second, each one 512 px tile
of 64 rows + its markers):

    precision   input      vision in  image rows  vision ms    TTFT ms  decode tok/s  peak RSS MiB  size MB
    fp32        1 frame            1          67     2209.0     2769.7          29.8          3793     1568
    fp32        2 frames           2         134     4441.6     5364.8          26.9          3793     1568
    fp32        4 frames           4         268     8149.3     9721.1          27.2          3793     1568
    fp32        8 frames           8         536    15902.3    18915.5          23.4          3793     1568
    int8        1 frame            1          67     1715.2     2177.7          55.0          1750      488
    int8        2 frames           2         134     3274.8     4037.4          53.7          1750      488
    int8        4 frames           4         268     7120.6     8414.4          52.7          1750      488
    int8        8 frames           8         536    13556.2    16214.8          40.7          1750      488
    int4        1 frame            1          67     1399.7     1946.5          89.9          1449      430
    int4        2 frames           2         134     2908.1     3703.6          88.0          1449      430
    int4        4 frames           4         268     5579.6     7002.0          75.4          1449      430
    int4        8 frames           8         536    11854.7    14238.1          70.0          1449      430

Qwen-VL's shapes (2026-12-03, `--family qwen_vl --precisions fp32,int8 --calib-items 2 --repeats 2 --warmup 1`,
quiet machine; ViT-bigG's width at 8 of its 48 layers, the resampler's 256 queries at their real shape, 2 QWen-7B
layers; int8 is the decoders' int8-sq, as `--calib` now gives; the fp32 export needed the fp32 check relative to the
rows' scale: its vision rows reach 15.1):

    precision   input      vision in  image rows  vision ms    TTFT ms  decode tok/s  peak RSS MiB  size MB
    fp32            -              1         256     2313.6     3291.9          21.7         10315     5270
    int8            -              1         256      975.8     1290.5         101.4          4121     1601

Monkey's shapes (the same tower and decoder; `--family monkey`, same flags, quiet): an 896 px image, five tower
passes (four 448 px windows with their LoRA merged, and the whole image at 448), 1280 rows:

    precision   input      vision in  image rows  vision ms    TTFT ms  decode tok/s  peak RSS MiB  size MB
    fp32            -              1        1280    13875.6    17321.2          20.3         11380     5304
    int8            -              1        1280     7097.8     8766.2          81.2          6194     1635

Qwen2-VL-2B's shapes (the tower whole, 4 of the 28 decoder layers: decode tok/s is not the 2B's). A first fp32 run
(AVX2 machine, `--precisions fp32`) found two defects, both fixed on 2026-12-03: the >2 GiB tower's trace and
decoder_text's rotary; it gave vision 1172 / 5331 ms at 224 / 448 px. The three precisions, rerun (2026-12-03, a 2-core AMD EPYC Zen 4 with AVX-512 VNNI, onnxruntime 1.32, int8 as s8s8, alone
and quiet; `--family qwen2vl --precisions fp32,int8,int4 --calib-items 9 --repeats 2 --warmup 1`, after the int8
export found a third defect, fixed: the tower's Linears are Gemms on 2-D rows, and ONNX Runtime ran Q/DQ Gemms in fp32
after dequantizing their weights every call (edgemm.calib.quantize now writes them as MatMul + Add); an earlier run
of the old int8 bundle, on a loaded machine, gave vision 1271 / 4984 ms and peak RSS 9156 MiB):

    precision   input      vision in  image rows  vision ms    TTFT ms  decode tok/s  peak RSS MiB  size MB
    fp32        224x224            1          64      975.6     1269.6          36.4          9235     6955
    fp32        448x448            1         256     3855.7     4323.0          35.4          9235     6955
    int8        224x224            1          64      325.5      449.5          90.1          5898     2447
    int8        448x448            1         256     1813.8     2003.6          81.5          5898     2447
    int4        224x224            1          64      359.7      494.5         163.1          5642     2247
    int4        448x448            1         256     1780.9     2000.1         167.0          5642     2247

Gemma 3-4B's shapes (2026-12-04, a 2-core AMD EPYC Zen 4 with AVX-512 VNNI, onnxruntime 1.32, the bench alone and
quiet; `--family gemma3 --precisions fp32,int8,int4 --calib-items 9 --repeats 2 --warmup 1`). Its SigLIP tower is
whole at 896 px (4096 patches; int8 / int4 cut its time less than other towers', likely the attention over 4096
patches, which is not quantized: not profiled). The decoder is REDUCED to 2 of 34 layers: TTFT and decode tok/s are
not the 4B's. 258 image rows as bench counts them. The int8 / int4 exports validate since the builder randomises the
zero-initialised mm_input_projection_weight:

    precision   vision ms    TTFT ms  decode tok/s  peak RSS MiB  size MB
    fp32          33899.9    34621.0          24.4         13321     5472
    int8          23232.6    23587.3          86.6          9442     2094
    int4          22957.9    23279.4         181.7          9100     1925

LLaVA-OneVision-0.5B's shapes at the three precisions (2026-12-04, the same machine as Gemma 3's, the bench alone
and quiet; `--family llava_onevision --precisions fp32,int8,int4 --calib-items 5 --repeats 1 --warmup 0`; the base
image and one tile: 2 vision inputs, 1485 rows; one repeat: read the decode column as rough):

    precision   vision ms    TTFT ms  decode tok/s  peak RSS MiB  size MB
    fp32           7181.2    13976.9          14.7          7624     6109
    int8           2819.0     5472.1          37.7          4760     1962
    int4           2966.0     5672.8          65.2          4429     1727
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# HuggingFaceTB/SmolVLM-256M-Instruct's config.json / processor settings (as recalled, not read from the hub: no
# network here). Tied embeddings give 228.1 M parameters; the released "256M" (513 MB in bf16) suggests an untied
# lm_head (+28.4 M = 49280 x 576): the same decode compute, a larger bundle.
SHAPES = {
    "smolvlm": {
        "text": dict(vocab_size=49280, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5,
                     rope_theta=100000.0, tie_word_embeddings=True),
        "vision": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                       image_size=512, patch_size=16, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
        "scale_factor": 4, "image_seq_len": 64, "image_splitting": False, "longest_edge": 512,
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
    },
    # the same family at test scale (a quick check of the builder, seconds)
    "smolvlm-tiny": {
        "text": dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=100000.0,
                     tie_word_embeddings=True),
        "vision": dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                       image_size=16, patch_size=4, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6),
        "scale_factor": 2, "image_seq_len": 4, "image_splitting": False, "longest_edge": 16,
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
    },
    # OpenGVLab/InternVL3-1B-hf: InternViT-300M-448px-V2_5 + Qwen2.5-0.5B (tied), 448 px tiles of 256 rows (pixel
    # shuffle 0.5), up to 12 tiles + a thumbnail; bench's 48 x 48 image is one tile (no thumbnail for one)
    "internvl": {
        "text": dict(vocab_size=151674, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                     rope_theta=1000000.0, tie_word_embeddings=True),
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=448, patch_size=14, use_qk_norm=False, norm_type="layer_norm", attention_bias=True,
                       use_mean_pooling=True, hidden_act="gelu", layer_norm_eps=1e-6, layer_scale_init_value=0.1),
        "image_seq_len": 256, "max_tiles": 12, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "export_max_tiles": 1,
    },
    "internvl-tiny": {
        "text": dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=True),
        "vision": dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                       patch_size=4, hidden_act="gelu", layer_norm_eps=1e-6),
        "image_seq_len": 4, "max_tiles": 6, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
    },
    # llava-hf/llava-onevision-qwen2-0.5b-ov-hf: SigLIP-so400m-patch14-384 (26 layers kept: feature layer -1 of the
    # trimmed tower) + Qwen2-0.5B, anyres_max_9 over 1x1 .. 6x6 grids of 384 px tiles (729 rows each); bench's 48 x 48
    # image: the base image + one tile, with newline rows
    "llava_onevision": {
        "text": dict(vocab_size=151647, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                     rope_theta=1000000.0, tie_word_embeddings=True),
        "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
                       image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                       vision_use_head=False),
        "anyres_max": 9, "pinpoints": [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)],
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "export_max_tiles": 1,
    },
    "llava_onevision-tiny": {
        "text": dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=True),
        "vision": dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                       patch_size=4, hidden_act="gelu_pytorch_tanh", vision_use_head=False),
        "anyres_max": 2, "pinpoints": [[16, 16], [16, 32], [32, 16], [32, 32]],
        "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
    },
    # google/gemma-3-4b-it: its real SigLIP tower (896 px, 4096 patches pooled 4 x 4 to 256 rows) and a REDUCED decoder:
    # the 4B's layer shapes and RoPE / sliding-window settings, but 2 of its 34 layers (one sliding, one full) and a
    # 65536-row vocabulary (the 4B's is 262208). The whole 4B does not fit this 2-core 24 GiB machine at fp32 (16 GB of
    # weights; an 0.9 B model's fp32 export peaks near 12 GB RSS here); 6 layers with the full vocabulary (1.66 B) do
    # not either. Decode tok/s and TTFT here are NOT the 4B's; the vision figure is its tower's.
    "gemma3": {
        "text": dict(vocab_size=65536, hidden_size=2560, intermediate_size=10240, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                     sliding_window=1024, layer_types=["sliding_attention", "full_attention"],
                     rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                      "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                     max_position_embeddings=131072, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh"),
        "vision": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=896, patch_size=14, layer_norm_eps=1e-6, vision_use_head=False),
        "image_seq_len": 256, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
    },
    "gemma3-tiny": {
        "text": dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                     layer_types=["sliding_attention", "full_attention"], max_position_embeddings=512,
                     rms_norm_eps=1e-6),
        "vision": dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                       patch_size=4, layer_norm_eps=1e-6, vision_use_head=False),
        "image_seq_len": 4, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
    },
    # Qwen/Qwen2-VL-2B-Instruct's config.json and preprocessor settings (as recalled, not read from the hub); the
    # tower whole (32 blocks of 1280, 675 M parameters), the decoder REDUCED to 4 of its 28 layers (the whole 2.2 B
    # model is 9 GB in fp32 before export: more than this shared 23 GiB machine's exports can hold): TTFT and decode
    # tok/s are not the 2B's; images of 224 and 448 px (64 and 256 merged rows)
    "qwen2vl": {
        "sweep": ["--images", "224x224,448x448"],
        "text": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=4,
                     num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                     tie_word_embeddings=True),
        "vision": dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, hidden_size=1536, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu"),
        "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 1280,
    },
    "qwen2vl-tiny": {
        "text": dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 1, 1]},
                     tie_word_embeddings=True),
        "vision": dict(depth=2, embed_dim=16, mlp_ratio=2, num_heads=2, hidden_size=32, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu"),
        "min_pixels": 56 * 56, "max_pixels": 28 * 28 * 64,
    },
    # --- issue 29's designs: the vision side at (or near) its released shapes, a small decoder; `sweep` is the
    # `edgemm bench --images / --frames` the script passes (a row per slice / frame count)
    # thunlp/LLaVA-UHD v1 (guozonghao96/llava-uhd-144-13b): CLIP ViT-L/14-336 (its real shape), the adaptive
    # resampler (12 x 12 queries, hidden // 128 heads) and a REDUCED decoder: 2 Llama layers of width 2048 (the 13B's
    # is 5120 x 40 layers, which with the resampler at 5120 does not fit the 6 GiB this script may use), Vicuna's
    # 32000-row vocabulary (the separators ',' / '\n' are ids 29892 and 13). Slice counts by aspect ratio (1024-px
    # keep-ratio resize, max 7 slices + the source image): 336x336 -> 3x2 + 1, 1008x336 -> 3x1 + 1, 1344x336 -> 4x1
    # + 1, 4000x200 -> unsliced (1)
    "llava_uhd": {
        "text": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=2,
                     num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=4096, rms_norm_eps=1e-5,
                     tie_word_embeddings=False),
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14, hidden_act="quick_gelu", projection_dim=768),
        "grid": 12, "sweep": ["--images", "4000x200,1008x336,336x336"],
    },
    "llava_uhd-tiny": {
        "text": dict(vocab_size=29900, hidden_size=256, intermediate_size=384, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5,
                     tie_word_embeddings=False),
        "vision": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                       patch_size=4, hidden_act="quick_gelu"),
        "grid": 3, "sweep": ["--images", "4000x200,336x336"],
    },
    # dvlab-research/LLaMA-VID (llama-vid-7b-full-224-video-fps-1): LAVIS's EVA ViT-g/14 at 224 px has width 1408,
    # 16 heads of 88, MLP 6144 and 39 layers (1.0 B parameters, 4 GB in fp32): here its width, heads, MLP and image
    # size with 8 of the 39 layers (a SMALLER tower: about 8/39 of its time per frame), InstructBLIP's Q-Former at
    # its shape (BERT-base: 12 layers of 768, cross-attention every 2nd, 32 queries; a 21-word vocabulary instead of
    # BERT's 30522), the mlp2x_gelu projector and a REDUCED decoder: 2 Llama layers of width 1024 (Vicuna-7B: 4096 x
    # 32). Frames at 1 a second; each frame 2 rows (compress 'mean')
    "llamavid": {
        "text": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-5,
                     tie_word_embeddings=False),
        "vision": dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=8, num_attention_heads=16,
                       image_size=224, patch_size=14, layer_norm_eps=1e-6),
        "qformer": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                        cross_attention_frequency=2, max_position_embeddings=512),
        "queries": 32, "import_args": ["--allow-bin"], "sweep": ["--frames", "1,4,16"],
    },
    "llamavid-tiny": {
        "text": dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False),
        "vision": dict(hidden_size=176, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                       patch_size=4, layer_norm_eps=1e-6),
        "qformer": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=1, intermediate_size=96,
                        cross_attention_frequency=2, max_position_embeddings=64),
        "queries": 4, "import_args": ["--allow-bin"], "sweep": ["--frames", "1,3"],
    },
    # llava-hf/LLaVA-NeXT-Video-7B-hf: CLIP ViT-L/14-336 (real; feature layer -2), LLaVA-v1.6's pinpoints, frames pooled
    # 2 x 2 (average: 144 rows a frame), 8 frames by default; a REDUCED decoder (2 Llama layers of width 1024; the
    # 7B's: 4096 x 32, vocabulary 32064)
    "llava_next_video": {
        "text": dict(vocab_size=32064, hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                     num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-5,
                     tie_word_embeddings=False),
        "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=336, patch_size=14, hidden_act="quick_gelu", projection_dim=768),
        "pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
        "export_max_tiles": 1, "sweep": ["--frames", "1,4,8"],
    },
    "llava_next_video-tiny": {
        "text": dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False),
        "vision": dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                       patch_size=4, hidden_act="quick_gelu", projection_dim=16),
        "pinpoints": [[16, 32], [32, 16], [32, 32]], "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
        "sweep": ["--frames", "1,3"],
    },
    # adept/fuyu-8b: no vision tower (30 x 30 x 3 patches through one Linear to 4096, a newline row per row of
    # patches, any size up to the 1080 x 1920 canvas) and the Persimmon-8B decoder at its real width (4096, 64 heads,
    # MLP 16384, q/k LayerNorm, partial rotary 0.5, squared ReLU) REDUCED to 1 of its 36 layers and an 8192-row
    # vocabulary (the 8B's: 262144): the TTFT here is one layer's over the image's rows
    "fuyu": {
        "text": dict(model_type="persimmon", vocab_size=8192, hidden_size=4096, intermediate_size=16384,
                     num_hidden_layers=1, num_attention_heads=64, max_position_embeddings=16384, qk_layernorm=True,
                     hidden_act="relu2", rope_parameters={"rope_type": "default", "rope_theta": 25000.0,
                                                          "partial_rotary_factor": 0.5}),
        "vision": dict(patch_size=30, canvas={"height": 1080, "width": 1920}),
        "sweep": ["--images", "300x300,640x480,1024x768,1920x1080"],
    },
    "fuyu-tiny": {
        "text": dict(model_type="persimmon", vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=2, max_position_embeddings=512, qk_layernorm=True, hidden_act="relu2",
                     rope_parameters={"rope_type": "default", "rope_theta": 25000.0, "partial_rotary_factor": 0.5}),
        "vision": dict(patch_size=6, canvas={"height": 36, "width": 48}),
        "sweep": ["--images", "20x13,100x61"],
    },
    # Qwen/Qwen-VL(-Chat): visual.py's ViT-bigG at its width (1664, 16 heads, MLP 8192, 448 px, 14 px patches) with 8
    # of its 48 layers (1.9 B parameters in all; 8 layers: about 8/48 of its time per image), the resampler at its shape
    # (256 queries, 4096 wide, 32 heads) and a REDUCED decoder: 2 QWen layers at Qwen-7B's width (4096, 32 heads, MLP
    # 11008; the 7B has 32 layers and 151936 vocabulary rows: here 8192, the byte-level test ranks + Qwen's specials)
    "qwen_vl": {
        "text": dict(vocab_size=8192, hidden_size=4096, intermediate_size=22016, num_hidden_layers=2,
                     num_attention_heads=32),
        "vision": dict(image_size=448, patch_size=14, width=1664, layers=8, heads=16, mlp_ratio=4.9231,
                       n_queries=256, output_dim=4096),
    },
    "qwen_vl-tiny": {
        "text": dict(vocab_size=600, hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4),
        "vision": dict(image_size=28, patch_size=7, width=48, layers=2, heads=4, mlp_ratio=2.5, output_dim=256),
    },
    # Yuliang-Liu/Monkey: the same tower over an 896 px image's four 448 px windows (a rank-16 / 32 LoRA each) and
    # the whole image resized to 448: five tower passes, 1280 rows; tower and decoder reduced as qwen_vl's
    "monkey": {
        "text": dict(vocab_size=8192, hidden_size=4096, intermediate_size=22016, num_hidden_layers=2,
                     num_attention_heads=32),
        "vision": dict(image_size=896, patch_size=14, width=1664, layers=8, heads=16, mlp_ratio=4.9231,
                       n_queries=256, output_dim=4096, lora_repeat_num=4),
        "monkey": True,
    },
    "monkey-tiny": {
        "text": dict(vocab_size=600, hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4),
        "vision": dict(image_size=896, patch_size=28, width=48, layers=2, heads=4, mlp_ratio=2.5, output_dim=256,
                       lora_repeat_num=4),
        "monkey": True,
    },
}
# HuggingFaceTB/SmolVLM2-256M-Video-Instruct (as recalled): SmolVLM-256M's shapes (above, all real) with its video
# processor's sampling (1 frame a second, at most 64, each frame resized to 512 px: one 64-row tile + its markers and
# a "Frame from MM:SS:" line) and SmolVLMProcessor's video chat template
SHAPES["smolvlm_video"] = {**SHAPES["smolvlm"], "video": {"fps": 1, "max_frames": 64, "longest_edge": 512},
                           "sweep": ["--frames", "1,2,4,8"]}
SHAPES["smolvlm_video-tiny"] = {**SHAPES["smolvlm-tiny"], "video": {"fps": 1, "max_frames": 8, "longest_edge": 16},
                                "sweep": ["--frames", "1,3"]}

SMOLVLM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>",
                    "<global-img>", "<image>"] + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]


def build_smolvlm(preset: dict, src: Path, seed: int = 0):
    """A random SmolVLMForConditionalGeneration saved as transformers saves it, with the tests' byte-level tokenizer
    (SmolVLM's special tokens), the image processor's settings, processor_config and chat template."""
    import torch
    from transformers import LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil
    from transformers.models.smolvlm.configuration_smolvlm import SmolVLMVisionConfig
    sys.path.insert(0, str(ROOT))
    from tests.test_smolvlm import TEMPLATE, save_tokenizer
    from tests.test_tokenizers import QWEN2_SPLIT, _byte_level
    tok = _byte_level(QWEN2_SPLIT, SMOLVLM_SPECIALS, 300, False, False, None)
    n_tok = tok.get_vocab_size(with_added_tokens=True)
    vocab = preset["text"]["vocab_size"]
    assert n_tok <= vocab, (n_tok, vocab)
    text = LlamaConfig(**preset["text"])
    vision = SmolVLMVisionConfig(**preset["vision"])
    cfg = SmolVLMConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                        scale_factor=preset["scale_factor"], image_token_id=tok.token_to_id("<image>"),
                        tie_word_embeddings=preset["text"]["tie_word_embeddings"])
    torch.manual_seed(seed)
    hf = SmolVLMForConditionalGeneration(cfg).eval()
    emb = hf.get_input_embeddings().weight
    assert emb.shape == (vocab, preset["text"]["hidden_size"]), emb.shape
    _save(hf, src, seed)
    save_tokenizer(tok, src)
    SmolVLMImageProcessorPil(size={"longest_edge": preset["longest_edge"]},
                             max_image_size={"longest_edge": preset["vision"]["image_size"]},
                             image_mean=preset["mean"], image_std=preset["std"],
                             do_image_splitting=preset["image_splitting"]).save_pretrained(src)
    (src / "processor_config.json").write_text(json.dumps({"image_seq_len": preset["image_seq_len"]}))
    (src / "chat_template.jinja").write_text(TEMPLATE)
    if preset.get("video"):                  # SmolVLM2's video: its video processor's sampling, the video template
        from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE
        v = preset["video"]
        _write(src, {"video_preprocessor_config.json": {
            "video_sampling": {"fps": v["fps"], "max_frames": v["max_frames"],
                               "video_size": {"longest_edge": v["longest_edge"]}},
            "max_image_size": {"longest_edge": preset["vision"]["image_size"]}, "image_mean": preset["mean"],
            "image_std": preset["std"], "resample": 1}, "chat_template.jinja": DEFAULT_CHAT_TEMPLATE})
    return sum(p.numel() for p in hf.parameters())


def _write(src: Path, files: dict):
    """The tokenizer / processor side files a builder writes beside the checkpoint (name -> text or JSON)."""
    for name, obj in files.items():
        (src / name).write_text(obj if isinstance(obj, str) else json.dumps(obj))


def _save(hf, src: Path, seed: int) -> None:
    """Save a random transformers model as transformers saves it, every parameter that starts at a constant (norm
    weights, zero biases, LayerScale, Gemma 3's zero-initialised projection) moved off it first. A constant left in
    place can make a stage compute nothing: Gemma 3's projection at its init, zeros, made every image's rows equal
    (0), so the vision check compared zeros with zeros and decoder_image saw no image."""
    import torch
    g = torch.Generator().manual_seed(seed + 11)
    with torch.no_grad():
        for p in hf.parameters():
            if p.numel() > 1 and bool(p.min() == p.max()):
                p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.02)
    hf.save_pretrained(src, safe_serialization=True)


def _tests():
    sys.path.insert(0, str(ROOT))


def build_internvl(preset: dict, src: Path, seed: int = 0):
    """A random InternVLForConditionalGeneration (InternViT + Qwen2) saved as transformers saves it, with the tests'
    Qwen-style tokenizer carrying InternVL's image tokens, a GotOcr2 processor (448 px tiles) and the chat template."""
    import torch
    from transformers import (GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration,
                              InternVLVisionConfig, Qwen2Config)
    _tests()
    from tests.test_internvl import IMAGE_TOKENS, TEMPLATE
    from tests.test_tokenizers import QWEN2_SPLIT, _byte_level
    tok = _byte_level(QWEN2_SPLIT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
                                    "<video>"], 300, True, False, None)
    assert tok.get_vocab_size(with_added_tokens=True) <= preset["text"]["vocab_size"]
    cfg = InternVLConfig(vision_config=InternVLVisionConfig(**preset["vision"]), text_config=Qwen2Config(**preset["text"]),
                         image_token_id=tok.token_to_id("<IMG_CONTEXT>"), downsample_ratio=0.5,
                         projector_hidden_act="gelu", vision_feature_layer=-1, vision_feature_select_strategy="default",
                         tie_word_embeddings=preset["text"]["tie_word_embeddings"])
    torch.manual_seed(seed)
    hf = InternVLForConditionalGeneration(cfg).eval()
    _save(hf, src, seed)
    tok.save(str(src / "tokenizer.json"))
    ids = tok.token_to_id
    s = preset["vision"]["image_size"]
    GotOcr2ImageProcessorPil(size={"height": s, "width": s}, min_patches=1, max_patches=preset["max_tiles"],
                             image_mean=preset["mean"], image_std=preset["std"]).save_pretrained(src)
    _write(src, {"tokenizer_config.json": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                           "tokenizer_class": "PreTrainedTokenizerFast",
                                           "extra_special_tokens": IMAGE_TOKENS},
                 "generation_config.json": {"eos_token_id": [ids("<|im_end|>"), ids("<|endoftext|>")],
                                            "pad_token_id": ids("<|endoftext|>")},
                 "processor_config.json": {"image_seq_length": preset["image_seq_len"],
                                           "processor_class": "InternVLProcessor"},
                 "chat_template.jinja": TEMPLATE})
    return sum(p.numel() for p in hf.parameters())


def build_llava_onevision(preset: dict, src: Path, seed: int = 0):
    """A random LlavaOnevisionForConditionalGeneration (SigLIP + Qwen2) laid out as llava-hf's checkpoints, with the
    tests' Qwen-style tokenizer (<image>, <video>), the anyres_max processor settings and the chat template."""
    import torch
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessorPil, Qwen2Config, SiglipVisionConfig)
    _tests()
    from tests.test_llava_onevision import OV_TEMPLATE, _tokenizer
    tok = _tokenizer()
    assert tok.get_vocab_size(with_added_tokens=True) <= preset["text"]["vocab_size"]
    ids = tok.token_to_id
    aspect = f"anyres_max_{preset['anyres_max']}"
    cfg = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**preset["vision"]),
                               text_config=Qwen2Config(**preset["text"]), image_token_index=ids("<image>"),
                               video_token_index=ids("<video>"), vision_feature_layer=-1,
                               vision_feature_select_strategy="full", projector_hidden_act="gelu",
                               image_grid_pinpoints=preset["pinpoints"], vision_aspect_ratio=aspect,
                               tie_word_embeddings=preset["text"]["tie_word_embeddings"])
    torch.manual_seed(seed)
    hf = LlavaOnevisionForConditionalGeneration(cfg).eval()
    _save(hf, src, seed)
    tok.save(str(src / "tokenizer.json"))
    s = preset["vision"]["image_size"]
    LlavaOnevisionImageProcessorPil(size={"height": s, "width": s}, image_grid_pinpoints=preset["pinpoints"],
                                    image_mean=preset["mean"], image_std=preset["std"]).save_pretrained(src)
    _write(src, {"tokenizer_config.json": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                                           "add_prefix_space": False, "tokenizer_class": "PreTrainedTokenizerFast",
                                           "model_max_length": preset["text"]["max_position_embeddings"]},
                 "generation_config.json": {"bos_token_id": ids("<|endoftext|>"), "eos_token_id": ids("<|im_end|>"),
                                            "pad_token_id": ids("<|endoftext|>")},
                 "processor_config.json": {"processor_class": "LlavaOnevisionProcessor",
                                           "num_image_tokens": (s // preset["vision"]["patch_size"]) ** 2,
                                           "vision_aspect_ratio": aspect, "vision_feature_select_strategy": "full"},
                 "chat_template.json": {"chat_template": OV_TEMPLATE}})
    return sum(p.numel() for p in hf.parameters())


def build_gemma3(preset: dict, src: Path, seed: int = 0):
    """A random Gemma3ForConditionalGeneration (SigLIP 896 px + Gemma 3 decoder) saved as transformers saves it, with
    the tests' Gemma-style tokenizer carrying its image tokens, the image processor's settings and chat template."""
    import torch
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil,
                              Gemma3TextConfig, SiglipVisionConfig)
    _tests()
    from tests.test_gemma3 import SPECIALS, TEMPLATE
    from tests.test_tokenizers import _sentencepiece
    tok = _sentencepiece(SPECIALS, 512, False, "<unk>", "<bos>")
    ids = tok.token_to_id
    assert tok.get_vocab_size(with_added_tokens=True) <= preset["text"]["vocab_size"]
    text = Gemma3TextConfig(**preset["text"], pad_token_id=ids("<pad>"), eos_token_id=ids("<eos>"),
                            bos_token_id=ids("<bos>"))
    cfg = Gemma3Config(text_config=text.to_dict(), vision_config=SiglipVisionConfig(**preset["vision"]).to_dict(),
                       mm_tokens_per_image=preset["image_seq_len"], boi_token_index=ids("<start_of_image>"),
                       eoi_token_index=ids("<end_of_image>"), image_token_index=ids("<image_soft_token>"),
                       tie_word_embeddings=True)
    torch.manual_seed(seed)
    hf = Gemma3ForConditionalGeneration(cfg).eval()
    _save(hf, src, seed)
    tok.save(str(src / "tokenizer.json"))
    s = preset["vision"]["image_size"]
    Gemma3ImageProcessorPil(size={"height": s, "width": s}, image_mean=preset["mean"], image_std=preset["std"],
                            resample=2).save_pretrained(src)
    _write(src, {"tokenizer_config.json": {
        "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True,
        "add_eos_token": False, "tokenizer_class": "PreTrainedTokenizerFast", "extra_special_tokens": {
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}},
        "generation_config.json": {"bos_token_id": ids("<bos>"), "eos_token_id": [ids("<eos>"), ids("<end_of_turn>")],
                                   "pad_token_id": ids("<pad>")},
        "chat_template.jinja": TEMPLATE})
    return sum(p.numel() for p in hf.parameters())


def build_qwen2vl(preset: dict, src: Path, seed: int = 0):
    """A random Qwen2VLForConditionalGeneration saved as transformers saves it, with the tests' byte-level tokenizer
    (Qwen's special tokens), the image processor's settings and Qwen2-VL's chat template."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil
    sys.path.insert(0, str(ROOT))
    from tests.test_qwen2vl import SPECIALS, TEMPLATE, save_tokenizer
    from tests.test_tokenizers import QWEN2_SPLIT, _byte_level
    tok = _byte_level(QWEN2_SPLIT, SPECIALS, 300, False, False, None)
    ids = tok.token_to_id
    assert tok.get_vocab_size(with_added_tokens=True) <= preset["text"]["vocab_size"]
    cfg = Qwen2VLConfig(text_config=preset["text"], vision_config=preset["vision"],
                        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
                        tie_word_embeddings=preset["text"]["tie_word_embeddings"])
    torch.manual_seed(seed)
    hf = Qwen2VLForConditionalGeneration(cfg).eval()
    _save(hf, src, seed)
    save_tokenizer(tok, src)
    v = preset["vision"]
    Qwen2VLImageProcessorPil(min_pixels=preset["min_pixels"], max_pixels=preset["max_pixels"],
                             patch_size=v["patch_size"], merge_size=v["spatial_merge_size"],
                             temporal_patch_size=v["temporal_patch_size"]).save_pretrained(src)
    (src / "chat_template.jinja").write_text(TEMPLATE)
    return sum(p.numel() for p in hf.parameters())



def build_llava_uhd(preset: dict, src: Path, seed: int = 0):
    """transformers' CLIPVisionModel + LlamaForCausalLM + the released AdaptSpatialResampler, random, written in
    thunlp/LLaVA-UHD's layout (tests/test_llava_uhd.py's write_release: flat config, mm_projector, the tower's
    folder, a byte-level tokenizer with Vicuna's template)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    _tests()
    from tests.test_llava_uhd import ReleasedResampler, write_release
    torch.manual_seed(seed)
    tower = CLIPVisionModel(CLIPVisionConfig(**preset["vision"])).eval()
    lm = LlamaForCausalLM(LlamaConfig(**preset["text"])).eval()
    D = preset["text"]["hidden_size"]
    rs = ReleasedResampler(preset["grid"], D, D // 128, preset["vision"]["hidden_size"]).eval()
    write_release(tower, lm, rs, src)
    return sum(p.numel() for m in (tower, lm, rs) for p in m.parameters())


def build_llamavid(preset: dict, src: Path, seed: int = 0):
    """transformers' InstructBlipVideo vision model (EVA) and Q-Former, a LlamaForCausalLM and LLaMA-VID's own
    tensors, random, written as the release saves them (tests/test_llamavid.py's write_release: the EVA tower in
    LAVIS's eva_vit_g.pth, a pickle: imported with --allow-bin; the Q-Former's BERT tokenizer)."""
    import torch
    from transformers import (InstructBlipVideoQFormerConfig, InstructBlipVideoQFormerModel,
                              InstructBlipVideoVisionConfig, InstructBlipVideoVisionModel, LlamaConfig, LlamaForCausalLM)
    _tests()
    from tests.test_llamavid import QWORDS, write_release
    torch.manual_seed(seed)
    v, D = preset["vision"], preset["text"]["hidden_size"]
    W, QW = v["hidden_size"], preset["qformer"]["hidden_size"]
    vis = InstructBlipVideoVisionModel(InstructBlipVideoVisionConfig(**v)).eval()
    qf = InstructBlipVideoQFormerModel(InstructBlipVideoQFormerConfig(vocab_size=len(QWORDS) + 1, encoder_hidden_size=W,
                                                                      **preset["qformer"])).eval()
    lm = LlamaForCausalLM(LlamaConfig(**preset["text"])).eval()
    with torch.no_grad():
        for layer in vis.encoder.layers:           # (LAVIS's blocks have no k bias)
            layer.self_attn.qkv.bias[W:2 * W] = 0
    g = torch.Generator().manual_seed(seed + 7)
    r = lambda *s: torch.randn(*s, generator=g) * 0.02                                          # noqa: E731
    p = {"vlm_att_query": r(1, preset["queries"], QW), "vlm_att_ln.weight": 1 + r(W), "vlm_att_ln.bias": r(W)}
    for name, (o, i) in (("vlm_att_projector", (W, QW)), ("vlm_att_key_projector", (W, W)),
                         ("vlm_att_val_projector", (D, W)), ("mm_projector.0", (D, W)), ("mm_projector.2", (D, D))):
        p[name + ".weight"], p[name + ".bias"] = r(o, i), r(o)
    write_release({"vision": vis, "qformer": qf, "lm": lm, "p": p, "grid": 1}, src)
    return sum(t.numel() for m in (vis, qf, lm) for t in m.parameters()) + sum(t.numel() for t in p.values())


def build_llava_next_video(preset: dict, src: Path, seed: int = 0):
    """A random LlavaNextVideoForConditionalGeneration (CLIP + Llama) saved as transformers saves it, LLaVA-NeXT's
    image processor (the preset's pinpoints), the tests' word-level tokenizer (<image> 3, video token 4) and a chat
    template that places <video>."""
    import torch
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaNextImageProcessorPil, LlavaNextVideoConfig,
                              LlavaNextVideoForConditionalGeneration)
    _tests()
    from tests.test_import import write_tokenizer
    from tests.test_video import TEMPLATE
    s = preset["vision"]["image_size"]
    cfg = LlavaNextVideoConfig(vision_config=CLIPVisionConfig(**preset["vision"]),
                               text_config=LlamaConfig(**preset["text"]), image_token_index=3, video_token_index=4,
                               vision_feature_layer=-2, vision_feature_select_strategy="default",
                               projector_hidden_act="gelu", image_grid_pinpoints=preset["pinpoints"],
                               spatial_pool_stride=2, spatial_pool_mode="average", tie_word_embeddings=False)
    torch.manual_seed(seed)
    hf = LlavaNextVideoForConditionalGeneration(cfg).eval()
    _save(hf, src, seed)
    LlavaNextImageProcessorPil(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                               image_grid_pinpoints=preset["pinpoints"], image_mean=preset["mean"],
                               image_std=preset["std"]).save_pretrained(src)
    write_tokenizer(src)
    (src / "chat_template.jinja").write_text(TEMPLATE)
    return sum(p.numel() for p in hf.parameters())


def build_fuyu(preset: dict, src: Path, seed: int = 0):
    """A random FuyuForCausalLM saved as transformers saves it, the tests' Fuyu-style tokenizer and
    FuyuImageProcessor's settings (the preset's canvas and patch)."""
    import torch
    from transformers import FuyuConfig, FuyuForCausalLM, FuyuImageProcessorPil
    _tests()
    from tests.test_fuyu import _tokenizer
    tok = _tokenizer()
    assert tok.get_vocab_size() <= preset["text"]["vocab_size"]
    v, p = preset["vision"], preset["vision"]["patch_size"]
    torch.manual_seed(seed)
    hf = FuyuForCausalLM(FuyuConfig(patch_size=p, image_token_id=tok.token_to_id("|SPEAKER|"),
                                    tie_word_embeddings=False, text_config=preset["text"])).eval()
    _save(hf, src, seed)
    tok.save(str(src / "tokenizer.json"))
    _write(src, {"tokenizer_config.json": {"bos_token": "|ENDOFTEXT|", "eos_token": "|ENDOFTEXT|",
                                           "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}})
    FuyuImageProcessorPil(size=v["canvas"], patch_size={"height": p, "width": p}).save_pretrained(src)
    return sum(t.numel() for t in hf.parameters())


def build_qwen_vl(preset: dict, src: Path, seed: int = 0):
    """Qwen-VL (Monkey) in its release's layout: visual.py's tower and resampler as tests/test_qwen_vl.py re-computes
    them (random, every parameter moved off its init), the QWen decoder's tensors under modeling_qwen.py's names at
    the preset's shapes, config.json (model_type qwen / monkey, `visual`), qwen.tiktoken (the tests' byte-level
    ranks + Qwen's specials) converted to tokenizer.json beside it."""
    import base64
    import torch
    from safetensors.torch import save_file
    _tests()
    from tests.test_qwen_vl import VisionTransformer, _randomize, _ranks
    from edgemm.families.qwen_vl import SPECIALS, convert_tokenizer
    t, monkey = preset["text"], bool(preset.get("monkey"))
    ranks = _ranks()
    vocab, D, L = t["vocab_size"], t["hidden_size"], t["num_hidden_layers"]
    assert len(ranks) + len(SPECIALS) <= vocab, (len(ranks) + len(SPECIALS), vocab)
    src.mkdir(parents=True, exist_ok=True)
    (src / "qwen.tiktoken").write_text("".join(f"{base64.b64encode(k).decode()} {r}\n" for k, r in ranks.items()))
    visual = {**preset["vision"], "image_start_id": len(ranks) + SPECIALS.index("<img>")}
    torch.manual_seed(seed)
    sd = {"transformer.visual." + k: v for k, v in _randomize(VisionTransformer(**visual), seed + 5).state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    r = lambda *s: torch.randn(*s, generator=g) * 0.02                                          # noqa: E731
    F2 = t["intermediate_size"] // 2
    sd.update({"transformer.wte.weight": r(vocab, D), "lm_head.weight": r(vocab, D), "transformer.ln_f.weight": 1 + r(D)})
    for i in range(L):
        h = f"transformer.h.{i}."
        sd.update({h + "ln_1.weight": 1 + r(D), h + "ln_2.weight": 1 + r(D), h + "attn.c_attn.weight": r(3 * D, D),
                   h + "attn.c_attn.bias": r(3 * D), h + "attn.c_proj.weight": r(D, D), h + "mlp.w1.weight": r(F2, D),
                   h + "mlp.w2.weight": r(F2, D), h + "mlp.c_proj.weight": r(D, F2)})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(src / "model.safetensors"))
    arch, mt = ("MonkeyLMHeadModel", "monkey") if monkey else ("QWenLMHeadModel", "qwen")
    _write(src, {"config.json": {
        "architectures": [arch], "model_type": mt, "hidden_size": D, "num_attention_heads": t["num_attention_heads"],
        "num_hidden_layers": L, "intermediate_size": t["intermediate_size"],
        "kv_channels": D // t["num_attention_heads"], "layer_norm_epsilon": 1e-6, "max_position_embeddings": 8192,
        "no_bias": True, "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 2048, "use_dynamic_ntk": True,
        "use_logn_attn": True, "tie_word_embeddings": False, "vocab_size": vocab, "visual": visual},
        "generation_config.json": {"chat_format": "chatml", "eos_token_id": len(ranks), "pad_token_id": len(ranks)}})
    convert_tokenizer(src, src)
    return sum(v.numel() for v in sd.values())


BUILDERS = {"smolvlm": build_smolvlm, "smolvlm-tiny": build_smolvlm, "internvl": build_internvl,
            "internvl-tiny": build_internvl, "llava_onevision": build_llava_onevision,
            "llava_onevision-tiny": build_llava_onevision, "gemma3": build_gemma3, "gemma3-tiny": build_gemma3,
            "qwen2vl": build_qwen2vl, "qwen2vl-tiny": build_qwen2vl, "smolvlm_video": build_smolvlm,
            "smolvlm_video-tiny": build_smolvlm, "llava_uhd": build_llava_uhd, "llava_uhd-tiny": build_llava_uhd,
            "llamavid": build_llamavid, "llamavid-tiny": build_llamavid, "llava_next_video": build_llava_next_video,
            "llava_next_video-tiny": build_llava_next_video, "fuyu": build_fuyu, "fuyu-tiny": build_fuyu,
            "qwen_vl": build_qwen_vl, "qwen_vl-tiny": build_qwen_vl, "monkey": build_qwen_vl,
            "monkey-tiny": build_qwen_vl}


def small_calib(d: Path, n: int) -> Path:
    """A calibration folder of the first n items of the shapes calibration split: the bundled set's 64 items take
    most of an int8 export's time at these sizes on 2 cores (random weights: the scales change no figure here)."""
    sys.path.insert(0, str(ROOT))
    from edgemm.calib.sets import write_calib_dir
    return write_calib_dir(d, n)


def sh(args, log):
    t = time.time()
    print("$ " + " ".join(map(str, args)), file=sys.stderr, flush=True)
    with open(log, "a") as f:
        r = subprocess.run([str(a) for a in args], stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {' '.join(map(str, args))}; see {log}")
    print(f"  done in {time.time() - t:.0f}s", file=sys.stderr, flush=True)
    return time.time() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="smolvlm", choices=sorted(SHAPES))
    ap.add_argument("--out", default="runs/family-shapes", help="working folder (checkpoint, bundles, results)")
    ap.add_argument("--precisions", default="fp32,int8,int4", help="onnx precisions, comma-separated")
    ap.add_argument("--threads", type=int, default=2, help="bench's CPU threads")
    ap.add_argument("--export-threads", type=int, default=None, help="export's CPU threads (default: export's own)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--sweep", default=None, help="bench's --images / --frames arguments instead of the preset's "
                    "(e.g. '--frames 1,2'; '' for none)")
    ap.add_argument("--calib-items", type=int, default=None,
                    help="calibrate on the first N shapes items (default: export's bundled 64)")
    ap.add_argument("--force", action="store_true", help="rebuild the checkpoint and re-export existing bundles")
    ap.add_argument("--build-only", action="store_true", help="build and import the checkpoint, then stop")
    ap.add_argument("--no-bench", action="store_true", help="build, import and export, then stop (bench later, e.g. "
                    "on a quiet machine: the same command without it reuses the bundles)")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    edgemm = [shutil.which("edgemm") or "edgemm"]
    preset, timings = SHAPES[a.family], {}
    src, ck = out / "src", out / "ck"
    if a.force or not (ck / "config.json").exists():
        t = time.time()
        shutil.rmtree(src, ignore_errors=True)
        n = BUILDERS[a.family](preset, src)
        timings["build_s"] = time.time() - t
        print(f"built {src}: {n / 1e6:.1f} M parameters in {timings['build_s']:.0f}s", file=sys.stderr)
        timings["import_s"] = sh(edgemm + ["import", src, "-o", ck, *preset.get("import_args", [])]
                                 + (["--force"] if ck.exists() else []), log)
    if a.build_only:
        return 0
    bundles = []
    for p in a.precisions.split(","):
        dst = out / p
        if a.force or not (dst / "edgemm.json").exists():
            th = ["--threads", a.export_threads] if a.export_threads else []
            if preset.get("export_max_tiles"):       # (the export's check runs the largest image the budget allows)
                th += ["--max-tiles", preset["export_max_tiles"]]
            if a.calib_items:          # (fp32 too: its int8 KV scales are fitted on the first 16 calibration items)
                th += ["--calib", small_calib(out / "calib", a.calib_items)]
            timings[f"export_{p}_s"] = sh(edgemm + ["export", "--target", "onnx", "--model", ck, "--precision", p,
                                                    "-o", dst, "--force"] + th, log)
        bundles.append(dst)
    if a.no_bench:
        return 0
    sweep = preset.get("sweep", []) if a.sweep is None else a.sweep.split()
    timings["bench_s"] = sh(edgemm + ["bench", *bundles, "--limit", "0", "--fidelity-prompts", "0", "--threads",
                                      a.threads, "--repeats", a.repeats, "--warmup", a.warmup, "--decode-steps",
                                      a.decode_steps, *sweep, "-o", out / "bench"], log)
    rep = json.loads((out / "bench" / "bench.json").read_text())
    rows = []
    for r in rep["results"]:                     # a row per bundle (precision) x --images / --frames setting
        p = Path(r["bundle"]).name
        rows.append({"precision": p, "input": r.get("input") or "-", **{k: r.get(k) for k in (
            "vision_inputs", "image_rows", "vision_ms", "ttft_ms", "decode_tok_s", "peak_rss_mb", "size_mb", "error")}})
    lines = [f"{a.family} shapes (random weights), onnx on CPU, {a.threads} threads",
             f"{'precision':<10} {'input':>10} {'vision in':>9} {'image rows':>10} {'vision ms':>10} {'TTFT ms':>10} "
             f"{'decode tok/s':>13} {'peak RSS MiB':>13} {'size MB':>8}"]
    for r in rows:
        if r.get("error"):
            lines.append(f"{r['precision']:<10} {r['input']:>10} error: {r['error'][:80]}")
            continue
        lines.append(f"{r['precision']:<10} {r['input']:>10} {r['vision_inputs']!s:>9} {r['image_rows']!s:>10} "
                     f"{r['vision_ms']:>10.1f} {r['ttft_ms']:>10.1f} {r['decode_tok_s']:>13.1f} "
                     f"{r['peak_rss_mb']:>13.0f} {r['size_mb']:>8.0f}")
    print("\n".join(lines))
    (out / "family_shapes.json").write_text(json.dumps({
        "family": a.family, "shapes": preset, "threads": a.threads, "results": rows, "timings_s": timings,
        "machine": rep.get("machine")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
