"""Every registered block kind declares its forms: its config spec, its support-matrix row (which targets compute
it), and, for decoder layer kinds, the emitter that writes it into the onnx / trt decoder graphs
(export/layer_emit.py). A block registered without them fails here, not in a user's export."""
from __future__ import annotations

import pytest

from edgemm.blocks import registry, spec, support
from edgemm.config import get_preset


def _blocks(role):
    registry.load_all()
    return [f"{role}:{k}" for k in registry.kinds(role)]


@pytest.mark.parametrize("role", ["vision", "connector", "layer"])
def test_every_block_has_a_support_row(role):
    rows = {f.block for f in support.FEATURES}
    for b in _blocks(role):
        assert b in rows or b in support.BASE_BLOCKS, f"{b} has no row in blocks/support.py FEATURES"
    for b, feature in support.BASE_BLOCKS.items():
        assert feature is None or feature in support.BY_NAME, (b, feature)
        assert b.split(":")[1] in registry.kinds(b.split(":")[0]), f"BASE_BLOCKS names an unregistered {b}"


@pytest.mark.parametrize("role", ["vision", "connector"])
def test_every_tower_and_connector_has_a_spec(role):
    spec.load_all()
    for b in _blocks(role):
        assert spec.get(role, b.split(":")[1]) is not None, f"{b} declares no spec (edgemm/blocks/kinds/)"


def test_every_layer_kind_has_a_graph_emitter():
    from edgemm.export.layer_emit import EMITTERS
    kinds = {b.split(":")[1] for b in _blocks("layer")}
    assert kinds == set(EMITTERS), f"layer kinds without an emitter: {kinds - set(EMITTERS)}; " \
                                   f"emitters of no layer kind: {set(EMITTERS) - kinds}"


def test_an_emitter_is_registered_once():
    from edgemm.export.layer_emit import Routed, emits
    with pytest.raises(ValueError, match="two emitters"):
        emits("routed")(type("Again", (Routed,), {}))


@pytest.mark.parametrize("over,kind", [({}, "routed"), ({"vision_rank": 4}, "low-rank"),
                                       ({"vision_delta_rank": 2}, "low-rank-delta"),
                                       ({"per_modality_kv": True, "per_modality_norms": True}, "per-modality-kv"),
                                       ({"single_branch": True}, "routed"),
                                       ({"single_branch": True, "n_experts": 4}, "moe")])
def test_a_branch_gets_its_kinds_emitter(over, kind):
    import torch
    from edgemm.export.layer_emit import branch_emitter
    from edgemm.model import EdgeMM
    cfg = get_preset("tiny-shapes")
    for k, v in over.items():
        setattr(cfg.decoder, k, v)
    torch.manual_seed(0)
    m = EdgeMM(cfg.validate())
    layer = m.decoder.layers[0]
    assert branch_emitter(cfg.decoder, layer, "vision").kind == kind
    assert branch_emitter(cfg.decoder, layer, "text").kind == ("moe" if "n_experts" in over else "routed")


def test_every_mtmd_composition_has_an_mmproj_writer():
    """Each llama.cpp projector a gguf export can route to (LLaVA's mlp, edgemm's cogvlm, every MTMD_GRAPHS
    composition's) has one registered writer; a second registration is refused."""
    from types import SimpleNamespace
    from edgemm.export import gguf_mtmd  # noqa: F401
    from edgemm.export.gguf_tensors import MMPROJ_WRITERS, mmproj_writer_for
    want = {"mlp", "cogvlm"} | (set(support.MTMD_GRAPHS) - {"qwen2vl"})
    want |= {gguf_mtmd.qwen2vl_projector(SimpleNamespace(vision=SimpleNamespace(mlp=m))) for m in ("gelu", "swiglu")}
    assert want <= set(MMPROJ_WRITERS), f"projectors without a writer: {want - set(MMPROJ_WRITERS)}"
    with pytest.raises(ValueError, match="two mmproj writers"):
        mmproj_writer_for("mlp")(lambda *a: {})
