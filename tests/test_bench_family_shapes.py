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
        heads = v.get("num_heads", v.get("num_attention_heads"))
        if heads:                                   # (Fuyu has no tower: a Linear over pixel patches)
            width = v.get("embed_dim", v.get("hidden_size"))
            assert width % heads == 0, name             # (Qwen2-VL's tower: embed_dim / num_heads)
        if "scale_factor" in p:                     # SmolVLM's pixel shuffle: the tile's rows
            side = v["image_size"] // v["patch_size"]
            assert side % p["scale_factor"] == 0 and (side // p["scale_factor"]) ** 2 == p["image_seq_len"], name


def test_tiny_preset_builds_and_imports(tmp_path):
    _script().main(["--family", "smolvlm-tiny", "--out", str(tmp_path), "--build-only"])
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["vision"]["tiling"] == "smolvlm" and cfg["vision"]["image_splitting"] is False
