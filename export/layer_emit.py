"""How each decoder layer kind is written into the onnx / trt decoder graphs: one emitter a kind, registered under the
kind the block registry gives the torch module (edgemm.blocks.layers: `routed`, `single`, `per-modality-kv`,
`low-rank`, `low-rank-delta`, `bridge`; edgemm.blocks.moe: `moe`; edgemm.blocks.cross: `gated-cross-attention`).

The graph builder (export/decoder_graph.py) owns what every layer shares (norms, residuals, attention of each
flavour, RoPE); it asks `branch_emitter` for the branch's emitter and calls its `qkv`, `proj` and `mlp`. A kind
overrides only what differs from the dense branch (`Routed`), as ONNX Runtime GenAI's model builder has one
subclass per architecture over `make_attention` / `make_mlp`. A new layer kind adds its torch module
(`@register("layer", kind)`), its spec (blocks/kinds/), its support row (blocks/support.py) and an emitter here;
tests/test_block_forms.py fails for a registered layer kind without one.
"""
from __future__ import annotations

import math

import numpy as np

from edgemm.export.graph import Graph, gelu_tanh, moe_mlp, norm_weights, np32, rms

EMITTERS: dict[str, "Routed"] = {}


def emits(kind: str):
    """Class decorator: the emitter of the layer kind `kind` (an instance is registered)."""
    def deco(cls):
        if kind in EMITTERS:
            raise ValueError(f"layer kind {kind!r} has two emitters")
        cls.kind = kind
        EMITTERS[kind] = cls()
        return cls
    return deco


def dense(g: Graph, x: str, mod, name: str) -> str:
    """x @ W^T (+ b) for an nn.Linear (or a Linear-like view: weight, bias)."""
    y = g.op("MatMul", [x, g.weight(f"{name}.weight.T", np32(mod.weight).T)], name=name)
    return y if mod.bias is None else g.op("Add", [y, g.weight(f"{name}.bias", np32(mod.bias))])


def low_rank(g: Graph, x: str, mod, name: str) -> str:
    """Libra's LowRankLinear as two MatMuls (x @ A^T @ B^T: the weights stay low-rank)."""
    h = g.op("MatMul", [x, g.weight(f"{name}.weight_A.T", np32(mod.weight_A).T)], name=f"{name}.A")
    return g.op("MatMul", [h, g.weight(f"{name}.weight_B.T", np32(mod.weight_B).T)], name=f"{name}.B")


@emits("routed")
class Routed:
    """A dense branch (edgemm.blocks.layers.Branch): fused QKV split into q, k, v (or given to GroupQueryAttention
    packed), optional per-head q/k norm, the attention output, a SwiGLU / GeGLU / squared-ReLU MLP."""
    kind = "routed"
    fused_qkv = True                    # one QKV projection (GroupQueryAttention can take it packed)

    def proj(self, g: Graph, x: str, mod, name: str) -> str:
        """One projection of this kind's branch."""
        return dense(g, x, mod, name)

    def qkv(self, g: Graph, c, br, h: str, p: str) -> tuple[str, str, str]:
        """-> q [1, T, H E], k, v [1, T, K E] before RoPE (per-head q / k norms applied)."""
        H, K, E = c.n_heads, c.kv_heads, c.head_dim
        if self.fused_qkv:
            q, k, v = g.op("Split", [self.proj(g, h, br.qkv, f"{p}.qkv"), g.i64([H * E, K * E, K * E])],
                           n_out=3, axis=-1)
        else:
            q, k, v = (self.proj(g, h, getattr(br, n), f"{p}.{n}") for n in "qkv")
        if c.qk_norm:                   # Qwen3 (RMSNorm), Persimmon (LayerNorm) over each head's Q and K, before RoPE
            def head_norm(t, n, nm):
                w = norm_weights(g, getattr(br, nm), f"{p}.{nm}")
                t = rms(g, g.op("Reshape", [t, g.i64([0, 0, n, E])]), w, c.rms_eps)
                return g.op("Reshape", [t, g.i64([0, 0, n * E])])
            q, k = head_norm(q, H, "q_norm"), head_norm(k, K, "k_norm")
        return q, k, v

    def split_gate_up(self, g: Graph) -> bool:
        """gate and up as two MatMuls: in ONNX Runtime's graphs (g.fused_norms), as GenAI's builder writes them
        (measured 1-2% faster a decode step on bench-0.5b int4 than one [D, 2F] MatMul + Split); TensorRT: one."""
        return g.fused_norms

    def mlp(self, g: Graph, x: str, br, name: str, ffn: int) -> str:
        """SwiGLU (Gemma: GELU-tanh gate), or Persimmon's down(relu(up(x))^2) with biases."""
        if getattr(br, "gate", None) is None:
            u = g.op("Relu", [self.proj(g, x, br.up, f"{name}.up")])
            return self.proj(g, g.op("Mul", [u, u]), br.down, f"{name}.down")
        if self.split_gate_up(g):
            gate, up = self.proj(g, x, br.gate, f"{name}.gate"), self.proj(g, x, br.up, f"{name}.up")
        else:
            gu = np.concatenate([np32(br.gate.weight).T, np32(br.up.weight).T], 1)   # [D, 2F]: one MatMul
            gate, up = g.op("Split", [g.op("MatMul", [x, g.weight(f"{name}.gate_up.weight.T", gu)],
                                           name=f"{name}.gate_up"), g.i64([ffn, ffn])], n_out=2, axis=-1)
        act = gelu_tanh(g, gate) if getattr(br, "geglu", False) else g.op("Mul", [gate, g.op("Sigmoid", [gate])])
        return self.proj(g, g.op("Mul", [act, up]), br.down, f"{name}.down")


@emits("single")
class Single(Routed):
    """LLaVA's single branch: image rows go through the text branch's weights (the vision graph is the text
    branch's layers over image rows)."""


@emits("moe")
class MoELayer(Routed):
    """An MoE layer's branch (edgemm.blocks.moe.MoE under `moe`): the attention of a dense branch, the experts in
    the graph's MoE form (graph.moe_mlp: com.microsoft MoE / QMoE, or standard ops for TensorRT)."""

    def mlp(self, g: Graph, x: str, br, name: str, ffn: int) -> str:
        return moe_mlp(g, x, br.moe, name, g.moe_form)


@emits("per-modality-kv")
class PerModalityKV(Routed):
    """mPLUG-Owl2's vision side: Q (the text branch's Q rows), K and V of its own as three projections; the
    attention output and MLP are the text branch's weights."""
    fused_qkv = False


@emits("low-rank")
class LowRank(Routed):
    """Libra's low-rank vision branch: every projection two MatMuls; q, k, v and gate, up apart."""
    fused_qkv = False

    def proj(self, g: Graph, x: str, mod, name: str) -> str:
        return low_rank(g, x, mod, name)

    def split_gate_up(self, g: Graph) -> bool:
        return True


@emits("low-rank-delta")
class LowRankDelta(Routed):
    """XComposer2's Partial-LoRA: image rows see W0 x + b + B A x (the text branch's W0 and a rank-r delta) in the
    projections that have one, plain Linears elsewhere."""

    def proj(self, g: Graph, x: str, mod, name: str) -> str:
        base = getattr(mod, "base", None)
        if base is None:
            return dense(g, x, mod, name)
        y = low_rank(g, x, mod, name)
        return g.op("Add", [dense(g, x, base, f"{name}.base"), y])

    def split_gate_up(self, g: Graph) -> bool:
        return True


@emits("bridge")
class Bridge:
    """Libra's cross-modal K/V bridge, on top of a branch's own K and V: both versions of this branch's rows (as
    text queries read them, heads [0, K); as vision queries do, [K, 2K)), the other modality's version with the
    rank-r bridge (low-rank k_bridge / v_bridge) added. -> (k, v, read): read is the half this branch attends."""
    kind = "bridge"

    def kv(self, g: Graph, br, h: str, p: str, branch: str, k: str, v: str) -> tuple[str, str, int]:
        read = int(branch == "vision")
        ko, vo = (g.op("Add", [t, low_rank(g, h, getattr(br, f"{n}_bridge"), f"{p}.{n}_bridge")])
                  for t, n in ((k, "k"), (v, "v")))                  # as the other modality's queries read them
        k, v = (g.op("Concat", [t, o] if read == 0 else [o, t], axis=-1) for t, o in ((k, ko), (v, vo)))
        return k, v, read


@emits("gated-cross-attention")
class GatedCrossAttention:
    """Flamingo / Idefics' tanh-gated cross-attention layer (edgemm.xattn.GatedCrossAttnLayer) before a decoder
    layer: reads the graph inputs cross_key.j / cross_value.j [1, H, n, E] (the image's, from the cross_kv stage)
    and cross_gate [1, T, 1] (1 where the row reads the image)."""
    kind = "gated-cross-attention"

    def block(self, g: Graph, c, xl, j: int, x: str) -> str:
        p, H, E = f"cross_layers.{j}", c.n_heads, c.head_dim
        h = rms(g, x, g.weight(f"{p}.attn_norm.weight", np32(xl.attn_norm.weight)), c.rms_eps)
        q = g.op("Reshape", [dense(g, h, xl.q, f"{p}.q"), g.i64([1, -1, H, E])])              # [1, T, H, E]
        if c.cross_attn_qk_norms:
            q = rms(g, q, g.weight(f"{p}.q_norm.weight", np32(xl.q_norm.weight)), c.rms_eps)
        kt = g.op("Transpose", [f"cross_key.{j}"], perm=[0, 1, 3, 2])                           # [1, H, E, n]
        s = g.op("Mul", [g.op("MatMul", [g.op("Transpose", [q], perm=[0, 2, 1, 3]), kt]),
                         g.scalar(1.0 / math.sqrt(E))])
        a = g.op("MatMul", [g.op("Softmax", [s], axis=-1), f"cross_value.{j}"])                 # [1, H, T, E]
        a = g.op("Reshape", [g.op("Transpose", [a], perm=[0, 2, 1, 3]), g.i64([1, -1, c.d_model])])
        a = g.op("Mul", [dense(g, a, xl.o, f"{p}.o"), g.act("cross_gate")])
        x = g.op("Add", [x, g.op("Mul", [a, g.weight(f"{p}.tanh_alpha_attn", np.tanh(np32(xl.alpha_attn)))])])
        h = rms(g, x, g.weight(f"{p}.ffn_norm.weight", np32(xl.ffn_norm.weight)), c.rms_eps)
        d = g.op("Mul", [EMITTERS["routed"].mlp(g, h, xl, p, c.ffn_dim),
                         g.weight(f"{p}.tanh_alpha_dense", np.tanh(np32(xl.alpha_dense)))])
        return g.op("Add", [x, d])

    def kv(self, g: Graph, c, xl, j: int, rows: str) -> list[str]:
        """The cross_kv stage's part for layer j: image rows -> cross_key.j / cross_value.j [1, H, n, E]."""
        H, E, outs = c.n_heads, c.head_dim, []
        for kv in ("key", "value"):
            t = g.op("Reshape", [dense(g, rows, getattr(xl, kv[0]), f"cross_layers.{j}.{kv[0]}"),
                                 g.i64([1, -1, H, E])])
            if kv == "key" and c.cross_attn_qk_norms:
                t = rms(g, t, g.weight(f"cross_layers.{j}.k_norm.weight", np32(xl.k_norm.weight)), c.rms_eps)
            outs.append(g.op("Transpose", [t], perm=[0, 2, 1, 3], out=f"cross_{kv}.{j}"))
        return outs


def branch_emitter(c, layer, branch: str) -> Routed:
    """The emitter of one layer's branch: the text branch is dense (`routed`) or an MoE layer's (`moe`); the vision
    branch is the kind blocks.layers builds for the config (a single-branch model's is the text branch's)."""
    from edgemm.blocks.layers import vision_branch_kind
    if branch == "vision" and vision_branch_kind(c) not in ("single", "routed"):
        return EMITTERS[vision_branch_kind(c)]
    return EMITTERS["moe" if "moe" in getattr(layer.text, "_modules", {}) else "routed"]
