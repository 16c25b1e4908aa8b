"""llama.cpp's decoder architectures as GGUF writers: one registered class an architecture (DECODER_ARCHS: llama,
qwen2, qwen2vl, gemma3, cogvlm), overriding only what differs, as convert_hf_to_gguf.py's model classes do: its
metadata keys, the tensors of one layer, and which edgemm Linear each tensor reads its input from (the importance
matrix, gguf_imatrix.py). gguf_tensors.write_decoder writes what every decoder file shares and asks the class for the
rest. This module imports nothing of edgemm (no cycles through the quantizer and the imatrix)."""
from __future__ import annotations

import numpy as np


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().contiguous().numpy()


def gemma3_attention_scale(d) -> float:
    """The query scale llama.cpp's gemma3 graph applies (src/models/gemma3.cpp): 1 / sqrt(head_dim), or for the
    62-layer (27B) model 1 / sqrt(n_embd / n_head)."""
    return (d.d_model / d.n_heads if d.n_layers == 62 else d.head_dim) ** -0.5


def _gemma3_keys(w, d) -> None:
    """Gemma 3's keys as convert_hf_to_gguf.py's Gemma3Model writes them: head_dim as key/value length, the sliding
    window with its per-layer pattern (a bool a layer: llama.cpp's default is every 6th layer full), the sliding
    layers' RoPE base, linear RoPE scaling on the full ones. No final_logit_softcapping: transformers'
    Gemma3ForConditionalGeneration (and edgemm) does not apply it, llama.cpp would."""
    import gguf
    w.add_key_length(d.head_dim)
    w.add_value_length(d.head_dim)
    if d.sliding_window and d.sliding_layers:
        w.add_sliding_window(d.sliding_window)
        w.add_sliding_window_pattern([i in d.sliding_layers for i in range(d.n_layers)])
        w.add_rope_freq_base_swa(d.rope_local_theta)
    if d.rope_linear_factor != 1.0:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(d.rope_linear_factor)


def _gemma3_layer(w, i: int, layer, d) -> None:
    """Gemma 3's per-layer norms (stored as (1 + w), llama.cpp's form): post-attention, post-FFN, per-head q / k.
    llama.cpp scales queries by gemma3_attention_scale after q_norm and RoPE (both linear in the q_norm weight);
    a model whose query_pre_attn_scalar differs has the ratio folded into attn_q_norm, exactly."""
    q_fix = d.query_scale ** -0.5 / gemma3_attention_scale(d) if d.query_scale else 1.0
    w.add_tensor(f"blk.{i}.post_attention_norm.weight", _np(layer.post_attn_norm.weight))
    w.add_tensor(f"blk.{i}.post_ffw_norm.weight", _np(layer.post_ffn_norm.weight))
    w.add_tensor(f"blk.{i}.attn_q_norm.weight", _np(layer.text.q_norm.weight) * np.float32(q_fix))
    w.add_tensor(f"blk.{i}.attn_k_norm.weight", _np(layer.text.k_norm.weight))


def rope_permute(wt: np.ndarray, heads: int) -> np.ndarray:
    """Q or K rows (HF order: each head's rotary halves, NEOX rope) -> llama.cpp's llama order (pairs interleaved,
    its normal rope), as convert_hf_to_gguf.py's LlamaModel.permute does."""
    return wt.reshape(heads, 2, wt.shape[0] // heads // 2, *wt.shape[1:]).swapaxes(1, 2).reshape(wt.shape)


def _write_attention(w, i: int, br, d, permute: bool) -> None:
    """Separate attn_q / attn_k / attn_v (+ biases: qwen2) and attn_output of a single-branch layer."""
    H, K, E = d.n_heads, d.kv_heads, d.head_dim
    qkv = _np(br.qkv.weight)
    bias = None if br.qkv.bias is None else _np(br.qkv.bias)
    for n, lo, hi, heads in (("q", 0, H * E, H), ("k", H * E, (H + K) * E, K), ("v", (H + K) * E, (H + 2 * K) * E, 0)):
        wt = qkv[lo:hi]
        w.add_tensor(f"blk.{i}.attn_{n}.weight", rope_permute(wt, heads) if permute and heads else wt)
        if bias is not None:            # qwen2: NEOX rope, never permuted
            w.add_tensor(f"blk.{i}.attn_{n}.bias", bias[lo:hi])
    w.add_tensor(f"blk.{i}.attn_output.weight", _np(br.o.weight))


def _write_ffn(w, i: int, br) -> None:
    """The feed-forward tensors of one single-branch layer: the dense SwiGLU MLP, or an MoE layer's router
    (ffn_gate_inp [n_expert, n_embd]) and stacked experts (ffn_{gate,up}_exps [n_expert, n_ff, n_embd],
    ffn_down_exps [n_expert, n_embd, n_ff]; ggml's ne reversed), as llama.cpp's llama arch loads them."""
    if "moe" in br._modules:
        moe = br.moe
        w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", _np(moe.router.weight))
        for n in ("gate", "up", "down"):
            w.add_tensor(f"blk.{i}.ffn_{n}_exps.weight", _np(getattr(moe, n)))
        return
    w.add_tensor(f"blk.{i}.ffn_gate.weight", _np(br.gate.weight))
    w.add_tensor(f"blk.{i}.ffn_up.weight", _np(br.up.weight))
    w.add_tensor(f"blk.{i}.ffn_down.weight", _np(br.down.weight))


# --------------------------------------------------------------------------- decoder architectures
# One class a llama.cpp decoder architecture, registered by name, overriding only what differs (as
# convert_hf_to_gguf.py's model classes do): its metadata keys, the tensors of one layer, and which edgemm Linear
# each of its matrices reads its input from (gguf_imatrix: the importance matrix of that tensor).
DECODER_ARCHS: dict[str, "Llama"] = {}


def decoder_arch_class(name: str):
    """Class decorator: the GGUF writer of llama.cpp's decoder architecture `name`."""
    def deco(cls):
        cls.arch = name
        DECODER_ARCHS[name] = cls()
        return cls
    return deco


@decoder_arch_class("llama")
class Llama:
    """A single-branch decoder (LLaVA): separate attn_q / attn_k / attn_v (+ biases), attn_output, a SwiGLU FFN or
    an MoE layer's router + stacked experts (Mixtral layout); llama's Q / K rows permuted for its normal RoPE."""
    arch = "llama"
    permute = True                      # HF's NEOX halves -> llama's interleaved pairs
    description = "edgemm single-branch decoder ({arch})"
    ONE_BRANCH = {"qkv": ["attn_q", "attn_k", "attn_v"], "o": ["attn_output"], "gate": ["ffn_gate"],
                  "up": ["ffn_up"], "down": ["ffn_down"]}

    def keys(self, w, d) -> None:
        """Keys beyond the ones every decoder file has."""

    def layer(self, w, i: int, layer, d) -> None:
        _write_attention(w, i, layer.text, d, permute=self.permute)
        _write_ffn(w, i, layer.text)

    def tensor_names(self, branch: str) -> dict:
        """edgemm branch attribute (qkv, o, gate, up, down) -> the layer's tensors reading that Linear's input."""
        return self.ONE_BRANCH


@decoder_arch_class("qwen2")
class Qwen2(Llama):
    """Qwen2 (LLaVA-OneVision, ...): as llama, NEOX RoPE (rows never permuted), QKV biases."""
    permute = False


@decoder_arch_class("qwen2vl")
class Qwen2VL(Qwen2):
    """Qwen2-VL / Qwen2.5-VL's language model: Qwen2's layout with M-RoPE, its sections (rotary pairs per temporal,
    height, width) as rope.dimension_sections with an unused fourth 0 (convert_hf_to_gguf.py's mrope_section)."""

    def keys(self, w, d) -> None:
        w.add_rope_dimension_sections([int(s) for s in d.mrope_section] + [0] * (4 - len(d.mrope_section)))


@decoder_arch_class("gemma3")
class Gemma3(Qwen2):
    """Gemma 3: Qwen2's layout plus its keys (_gemma3_keys) and per-layer norms (_gemma3_layer)."""

    def keys(self, w, d) -> None:
        _gemma3_keys(w, d)

    def layer(self, w, i: int, layer, d) -> None:
        _gemma3_layer(w, i, layer, d)
        super().layer(w, i, layer, d)


@decoder_arch_class("cogvlm")
class CogVLM(Llama):
    """edgemm's own family: llama.cpp's cogvlm, the text branch under the ordinary names, the vision branch under
    blk.N.vis_* (fused QKV both; norms shared)."""
    description = "edgemm routed-visual-expert decoder (text branch: blk.N.*, vision branch: blk.N.vis_*)"
    BRANCHES = {"text": {"qkv": ["attn_qkv"], "o": ["attn_output"], "gate": ["ffn_gate"], "up": ["ffn_up"],
                         "down": ["ffn_down"]},
                "vision": {"qkv": ["vis_attn_qkv"], "o": ["vis_attn_output"], "gate": ["vis_gate"],
                           "up": ["vis_up"], "down": ["vis_down"]}}

    def layer(self, w, i: int, layer, d) -> None:
        for branch, br in (("text", layer.text), ("vision", layer.vision)):
            for attr, (name,) in self.BRANCHES[branch].items():
                w.add_tensor(f"blk.{i}.{name}.weight", _np(getattr(br, attr).weight))

    def tensor_names(self, branch: str) -> dict:
        return self.BRANCHES.get(branch, {})
