"""benchmarks/bench_family_shapes.py: its shape presets are consistent, and its builder makes a checkpoint that
`edgemm import` takes (at test scale: seconds)."""
import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")
SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_family_shapes.py"


def _script():
    spec = importlib.util.spec_from_file_location("bench_family_shapes", SCRIPT)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def test_presets_are_consistent():
    m = _script()
    assert set(m.SHAPES) == set(m.BUILDERS)
    for name, p in m.SHAPES.items():
        t, v = p["text"], p["vision"]
        assert t["hidden_size"] % t["num_attention_heads"] == 0
        assert t["num_attention_heads"] % t.get("num_key_value_heads", t["num_attention_heads"]) == 0
        heads = v.get("num_heads", v.get("num_attention_heads", v.get("heads")))
        if heads:                                   # (Fuyu has no tower: a Linear over pixel patches)
            width = v.get("embed_dim", v.get("hidden_size", v.get("width")))
            assert width % heads == 0, name             # (Qwen2-VL's tower: embed_dim / num_heads)
        if "scale_factor" in p:                     # SmolVLM's pixel shuffle: the tile's rows
            side = v["image_size"] // v["patch_size"]
            assert side % p["scale_factor"] == 0 and (side // p["scale_factor"]) ** 2 == p["image_seq_len"], name


def test_tiny_preset_builds_and_imports(tmp_path):
    _script().main(["--family", "smolvlm-tiny", "--out", str(tmp_path), "--build-only"])
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["vision"]["tiling"] == "smolvlm" and cfg["vision"]["image_splitting"] is False


def test_tiny_sweep_preset_benches_a_row_per_input(tmp_path):
    """A preset's sweep (fuyu-tiny: --images 20x13,100x61) goes to `edgemm bench`: a row per image size, Fuyu's rows
    growing with the size (a patch row each + its newline rows)."""
    _script().main(["--family", "fuyu-tiny", "--out", str(tmp_path), "--precisions", "fp32", "--repeats", "1",
                    "--warmup", "0", "--decode-steps", "2", "--threads", "1"])
    rows = json.loads((tmp_path / "family_shapes.json").read_text())["results"]
    assert [(r["precision"], r["input"], r["vision_inputs"]) for r in rows] == [("fp32", "20x13", 1),
                                                                               ("fp32", "100x61", 1)]
    assert rows[0]["image_rows"] < rows[1]["image_rows"] and all(r["vision_ms"] > 0 for r in rows)


def test_monkey_preset_builds_in_the_release_layout(tmp_path):
    """The Qwen-VL / Monkey builder writes the release's layout (config.json `visual`, qwen.tiktoken): `edgemm import`
    detects Monkey and keeps every source tensor; an image is its four windows' and the global view's 1280 rows."""
    _script().main(["--family", "monkey-tiny", "--out", str(tmp_path), "--build-only"])
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["vision"]["arch"] == "qwen" and cfg["vision"]["window"] == 448 and len(cfg["vision"]["window_lora"]) == 2
    from edgemm.config import ModelConfig
    assert ModelConfig.from_dict(cfg).n_image_rows == 1280


def test_builder_moves_constant_parameters_off_their_init(tmp_path):
    """Gemma 3's projection starts at zeros in transformers: left there, every image's rows were 0 and the bench's
    checks compared zeros. The builder's checkpoint has no constant tensor, and the imported model's image rows
    differ between two images."""
    import numpy as np
    import torch
    from safetensors.numpy import load_file
    from edgemm.checkpoint import load_checkpoint
    _script().main(["--family", "gemma3-tiny", "--out", str(tmp_path), "--build-only"])
    state = load_file(str(tmp_path / "src" / "model.safetensors"))
    constant = [k for k, v in state.items() if v.size > 1 and v.min() == v.max()]
    assert not constant and any(k.endswith("mm_input_projection_weight") for k in state), constant
    m, _ = load_checkpoint(tmp_path / "ck")
    S = m.cfg.vision.image_size
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        a, b = (m.encode_image(torch.randn(1, 3, S, S, generator=g)).numpy() for _ in range(2))
    assert np.abs(a - b).max() > 1e-3 and np.abs(a).max(axis=-1).min() > 0
