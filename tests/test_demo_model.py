"""Acceptance of the shipped demo model: accuracy on the 1,000 held-out test questions."""
import json

from edgemm.checkpoint import DEMO_DIR
from tests.conftest import requires_demo


@requires_demo
def test_shipped_tiny_shapes_accuracy_does_not_regress():
    # Measured 0.969 on the 1,000 test questions (colour 1.000, count 0.996, position 0.888, shape 0.993).
    # The target is 0.90 overall; every type is guarded a few points under its measured level.
    from edgemm.evaluate import evaluate
    from edgemm.runtimes.torch_backend import TorchBackend
    res = evaluate(TorchBackend.open(model="tiny-shapes", device="cpu"), progress=False)
    assert res["total"] == 1000
    assert set(res["per_type"]) == {"color", "shape", "count", "position"}
    assert res["accuracy"] >= 0.90, res["per_type"]
    assert all(t["accuracy"] >= 0.85 for t in res["per_type"].values()), res["per_type"]


@requires_demo
def test_shipped_weights_are_small_and_loadable():
    size = sum(p.stat().st_size for p in DEMO_DIR.iterdir())
    assert size <= 20_000_000                    # 20 MB (fp16 storage: about 12.9 MB)
    cfg = json.loads((DEMO_DIR / "config.json").read_text())
    assert cfg["decoder"]["d_model"] % 256 == 0 and cfg["decoder"]["ffn_dim"] % 256 == 0
