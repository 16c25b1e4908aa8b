"""Families as registered plug-ins and the one support matrix they are described by (edgemm.families,
edgemm.blocks.support): the README's table, `edgemm families`, detection, and refusals generated from the data."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgemm import families
from edgemm.blocks import support
from edgemm.cli import main
from edgemm.config import get_preset
from edgemm.errors import EdgemmError

README = Path(__file__).resolve().parents[1] / "README.md"


def _readme_family_rows() -> list[list[str]]:
    text = README.read_text()
    start = text.index("| family (`--from`) |")
    rows = []
    for line in text[start:].splitlines():
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[2:]


def test_readme_table_is_the_registry():
    readme = _readme_family_rows()
    generated = [[f"`{r['family']}`", r["source"], r["computes"], r["targets"]] for r in families.table()]
    assert readme == generated, "README's family table differs from `edgemm families`: regenerate it from " \
                                "edgemm.families.readme_table()"
    assert len(readme) >= 9 and "`internvl`" in [r[0] for r in readme]      # every module registered


def test_cli_prints_the_families_and_the_matrix():
    r = CliRunner().invoke(main, ["families"])
    assert r.exit_code == 0, r.output
    for name in ("cogvlm", "libra", "llava", "llava_next", "blip2", "instructblip", "idefics", "llava_next_video",
                 "internvl"):
        assert re.search(rf"^{name}\s", r.output, re.M), name
    for f in support.FEATURES:
        assert f.name in r.output
    j = json.loads(CliRunner().invoke(main, ["families", "--json"]).output)
    assert {f["family"] for f in j["families"]} == set(families.names())
    gca = next(f for f in j["features"] if f["name"] == "gated cross-attention")
    assert gca["targets"] == ["torch", "onnx", "trt"] and gca["unquantized_only"]


def test_targets_follow_the_matrix():
    """Changing the data changes the derived targets (the table is not written by hand)."""
    t = {r["family"]: r["targets"] for r in families.table()}
    assert t["llava"].startswith("onnx, trt, gguf (not per-head q/k norm")
    assert "gguf" not in t["idefics"] and "gguf" not in t["libra"]
    assert t["blip2"].endswith("gguf (not head_dim of its own; vision stage in ONNX)")    # llama.cpp's decoder only
    assert t["idefics"] == "onnx (fp32, fp16), trt (fp16)"
    assert support.target_summary(["q-former adapter"]) == "onnx, trt"
    assert support.target_summary(["single branch (llava)", "clip vision tower", "mlp projector"],
                                  ["qkv bias"]) == "onnx, trt, gguf"
    # qkv bias is llama.cpp's only inside its llava graph: edgemm's own family (cogvlm graph) lacks it
    assert support.target_summary([], ["qkv bias"]) == "onnx, trt, gguf (not qkv bias)"


@pytest.mark.parametrize("hf, want", [
    ({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}, "llava"),
    ({"architectures": ["LlavaNextForConditionalGeneration"]}, "llava_next"),
    ({"model_type": "blip-2"}, "blip2"),
    ({"model_type": "instructblip"}, "instructblip"),
    ({"architectures": ["IdeficsForVisionText2Text"]}, "idefics"),
    ({"model_type": "libra"}, "libra"),
    ({"architectures": ["LlavaNextVideoForConditionalGeneration"]}, "llava_next_video"),
    ({"architectures": ["CogVLMForCausalLM"], "auto_map": {"AutoModelForCausalLM": "modeling_cogvlm.CogVLMForCausalLM"}},
     "cogvlm"),
])
def test_detection(hf, want):
    assert families.detect(hf) == want


def test_unknown_family_lists_the_registered():
    with pytest.raises(EdgemmError, match="edgemm imports cogvlm, libra, llava, llava_next, blip2, instructblip, idefics, llava_next_video"):
        families.detect({"model_type": "mllama"})
    with pytest.raises(EdgemmError, match="unknown family 'mllama'; edgemm imports cogvlm"):
        families.get("mllama")


def test_registration_checks_its_features():
    with pytest.raises(ValueError, match="support matrix lacks"):
        @families.register
        class Bad(families.Family):
            name = "bad-family"
            core = ("a feature nobody computes",)
    assert "bad-family" not in families.REGISTRY


def test_matrix_is_consistent():
    assert len({f.name for f in support.FEATURES}) == len(support.FEATURES)
    import edgemm.model  # noqa: F401  (registers every block)
    from edgemm.blocks import registry
    for f in support.FEATURES:
        role, _, kind = f.block.partition(":")
        assert role in ("vision", "connector", "layer", "option") and kind, f.block
        if role != "option":
            assert kind in registry.kinds(role), f"{f.name}: {f.block} is not a registered block"
        assert "torch" in f.targets, f"{f.name}: the reference computes every feature"
    for fam in families.families().values():
        assert set(fam.core).isdisjoint(fam.optional), fam.name
        for b in fam.blocks:
            role, _, kind = b.partition(":")
            assert kind in registry.kinds(role), f"{fam.name}: {b} is not a registered block"


def test_refusals_come_from_the_matrix():
    cfg = get_preset("tiny-shapes")
    assert cfg.variants() == [] and support.refusal(cfg, "gguf") is None
    cfg.decoder.qkv_bias = True                          # edgemm's own family through llama.cpp's cogvlm graph
    assert support.refusal(cfg, "gguf") == "qkv bias" and support.refusal(cfg, "onnx") is None
    assert support.targets_that_can("qkv bias", exclude="gguf") == "onnx, trt"
    assert support.export_targets(cfg) == "onnx, trt"
    assert support.targets_that_can("some future variant") == support.NO_TARGET
