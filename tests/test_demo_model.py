"""Acceptance of the shipped demo model: accuracy on the 1,000 held-out test questions."""
import json

from edgemm.checkpoint import DEMO_DIR
from tests.conftest import requires_demo


@requires_demo
def test_shipped_tiny_shapes_reaches_90_percent():
    from edgemm.evaluate import evaluate
    from edgemm.runtimes.torch_backend import TorchBackend
    res = evaluate(TorchBackend.open(model="tiny-shapes", device="cpu"), progress=False)
    assert res["total"] == 1000
    assert set(res["per_type"]) == {"color", "shape", "count", "position"}
    assert res["accuracy"] >= 0.90, res["per_type"]


@requires_demo
def test_shipped_weights_are_small_and_loadable():
    size = sum(p.stat().st_size for p in DEMO_DIR.iterdir())
    assert size <= 20 * 1024 * 1024
    cfg = json.loads((DEMO_DIR / "config.json").read_text())
    assert cfg["decoder"]["d_model"] % 256 == 0 and cfg["decoder"]["ffn_dim"] % 256 == 0
