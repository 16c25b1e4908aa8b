"""The torch backend's CPU Linears with their weights held in oneDNN's own layout (packed once at load).

torch's CPU matmul (`F.linear`, MKL's sgemm) re-packs the weight on every call that has more than one row. Decode
steps are one row, but a prefill piece of 2-32 rows then costs about 2-3x a one-row step, so on a 2-core box any
piece beside a decode step stalls the running streams (serve's chunked prefill, issue 31). oneDNN's linear with a
weight reordered once reads it as it is: `python benchmarks/bench_piece_cost.py --compare` measures both.

The swap is in place (the module keeps its identity, so a Linear another block reads through a plain reference —
XComposer2's LowRankDelta.base, mPLUG-Owl2's shared Q rows — sees the same module): its class becomes PackedLinear,
its dense `weight` parameter is dropped, and `weight` reads back the dense tensor (a copy; only the rare readers
above pay it). A weight tied to another parameter (the LM head and the embedding table) stays dense: packing it
would hold it twice. A checkpoint's tensors are views of one mapping of its safetensors file, which stays resident
while any of them lives: the parameters left dense are copied out of it, so that the packed weights' old pages go
(their peak stays: the file's pages and the packed copy, both resident once while packing)."""
from __future__ import annotations

import torch
import torch.nn as nn


class PackedLinear(nn.Linear):
    """An nn.Linear whose fp32 weight (and bias) oneDNN holds pre-reordered; made by pack_linears, not built."""

    def forward(self, x):
        if x.dtype != torch.float32 or x.device.type != "cpu":       # (a caller's odd input: the dense path)
            return torch.nn.functional.linear(x, self.weight, self.bias)
        y = torch._C._nn.mkldnn_linear(x.contiguous().to_mkldnn(), self._packed_w, self._packed_b)
        return y.to_dense()

    @property
    def weight(self):
        return self._packed_w.to_dense()

    @property
    def bias(self):
        return None if self._packed_b is None else self._packed_b.to_dense()


def packable(model: nn.Module) -> list[nn.Linear]:
    """The plain fp32 CPU Linears of `model` whose weight no other parameter shares."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return [m for m in model.modules()
            if type(m) is nn.Linear and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"
            and seen.get(id(m.weight)) == 1]


def pack_linears(model: nn.Module) -> int:
    """Pack `model`'s packable Linears in place (see the module docstring); returns how many. A torch without
    oneDNN packs none."""
    if not torch.backends.mkldnn.is_available():
        return 0
    mods = packable(model)
    with torch.no_grad():
        for m in mods:
            w, b = m.weight.detach(), m.bias
            m.__dict__["_packed_w"] = w.contiguous().to_mkldnn()
            m.__dict__["_packed_b"] = None if b is None else b.detach().contiguous().to_mkldnn()
            del m._parameters["weight"]
            del m._parameters["bias"]
            m.__class__ = PackedLinear
        if mods:
            for t in [*model.parameters(), *model.buffers()]:      # (out of the file's mapping, if any)
                t.data = t.data.clone()
    return len(mods)
