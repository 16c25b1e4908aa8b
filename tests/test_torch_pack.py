"""The torch backend's CPU Linears packed in oneDNN's layout (runtimes/torch_pack.py): the same function as torch's
own dense F.linear, in place (blocks that read a Linear's weight or call it through a plain reference still work),
tied weights left dense, and the backend opening with them packed."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgemm.config import get_preset
from edgemm.model import EdgeMM, KVCache
from edgemm.runtimes.torch_pack import PackedLinear, pack_linears

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


def _model(seed=0, **decoder):
    cfg = get_preset("tiny-shapes")
    cfg.decoder.n_layers = 2
    for k, v in decoder.items():
        setattr(cfg.decoder, k, v)
    m = EdgeMM(cfg.validate()).init_weights(seed).eval()
    with torch.no_grad():                       # biases, deltas and norms away from their initial constants
        g = torch.Generator().manual_seed(seed + 1)
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return m


def _logits(m):
    g = torch.Generator().manual_seed(3)
    pre, post = torch.randint(4, 500, (1, 5), generator=g), torch.randint(4, 500, (1, 7), generator=g)
    pixels = torch.randn(1, 3, m.cfg.vision.image_size, m.cfg.vision.image_size, generator=g)
    with torch.inference_mode():
        cache = KVCache.empty(m.cfg.decoder)
        _, pos = m.forward_segment("text", pre, cache, 0)
        _, pos = m.forward_segment("image", m.encode_image(pixels), cache, pos)
        out = [m.forward_segment("text", post, cache, pos)[0][0]]
        pos += post.shape[1]
        out.append(m.forward_segment("text", post[:, :1], cache, pos)[0][0])     # a one-row step
    return torch.cat(out)


def test_packed_linear_is_torch_linear():
    lin = nn.Linear(96, 40)
    with torch.no_grad():
        lin.bias.normal_()
    w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    holder = nn.Sequential(lin)
    assert pack_linears(holder) == 1
    assert type(lin) is PackedLinear and "weight" not in lin._parameters
    assert torch.equal(lin.weight, w) and torch.equal(lin.bias, b)       # read back as it was
    for shape in ((1, 96), (5, 96), (2, 7, 96)):
        x = torch.randn(*shape)
        with torch.inference_mode():
            assert torch.allclose(lin(x), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    xt = torch.randn(96, 6).t()                                          # a strided input
    with torch.inference_mode():
        assert torch.allclose(lin(xt), F.linear(xt, w, b), atol=1e-5, rtol=1e-5)
        x64 = torch.randn(3, 96, dtype=torch.float64)          # another dtype: refused as nn.Linear refuses it
        with pytest.raises(RuntimeError, match="dtype"):
            F.linear(x64, w, b)
        with pytest.raises(RuntimeError, match="dtype"):
            lin(x64)


@pytest.mark.parametrize("variant", [
    {},                                                                       # routed text / vision branches
    {"n_kv_heads": 2, "qkv_bias": True, "tie_embeddings": True},
    {"per_modality_kv": True, "per_modality_norms": True, "n_kv_heads": 2},  # mPLUG-Owl2: shared Q rows
    {"vision_delta_rank": 4},                                              # XComposer2: LowRankDelta.base
    {"vision_rank": 8, "per_modality_norms": True},                         # Libra's low-rank vision branch
])
def test_packed_model_computes_what_the_dense_model_does(variant):
    m = _model(**variant)
    dense = copy.deepcopy(m)
    tied = m.cfg.decoder.tie_embeddings
    n = pack_linears(m)
    plain = sum(type(x) is nn.Linear for x in dense.modules())
    assert n == plain - (1 if tied else 0)                  # every plain Linear, but a tied LM head
    if tied:
        assert type(m.decoder.lm_head) is nn.Linear and m.decoder.lm_head.weight is m.decoder.tok_embeddings.weight
    got, want = _logits(m), _logits(dense)
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (got - want).abs().max()
    assert not torch.equal(want, _logits(_model(seed=5, **variant)))     # (the comparison can fail)


def test_torch_backend_packs_on_the_cpu_and_answers_the_same():
    from edgemm.runtimes.torch_backend import TorchBackend
    packed = TorchBackend.open(model="tiny-shapes", device="cpu", threads=1)
    dense = TorchBackend.open(model="tiny-shapes", device="cpu", threads=1, pack=False)
    assert any(type(x) is PackedLinear for x in packed.model.modules())
    assert not any(type(x) is PackedLinear for x in dense.model.modules())
    ids = packed.tokenizer.encode("What color is the square?")
    a, b = packed.new_state(), dense.new_state()
    la, lb = packed.text(a, ids), dense.text(b, ids)
    np.testing.assert_allclose(la, lb, atol=1e-4, rtol=1e-4)
    for _ in range(4):                                      # greedy steps: the same tokens
        t = int(np.argmax(la))
        assert t == int(np.argmax(lb))
        la, lb = packed.text(a, [t]), dense.text(b, [t])
        np.testing.assert_allclose(la, lb, atol=1e-4, rtol=1e-4)
