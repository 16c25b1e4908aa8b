"""`edgemm import`: Hugging Face-layout checkpoints of the CogVLM, LLaVA and Libra families -> edgemm checkpoints.

A source is a directory with config.json, the weights (safetensors shards + model.safetensors.index.json, a single
model.safetensors, or pytorch_model*.bin read with torch.load(weights_only=True)) and tokenizer files.

1. The family comes from config.json (model_type / architectures / auto_map) unless given.
2. A family mapper turns the config into an edgemm ModelConfig and a plan: every edgemm tensor with the source
   tensors it is made of (renames, fused QKV concatenations, a reordered position table) and the source tensors
   that are deliberately not imported, each with its reason. Everything is checked before a byte is written:
   unexpected or missing tensors, missing shards, shapes (the recipes run on meta tensors).
3. Streaming: the source shards are opened one at a time with safetensors' safe_open (memory-mapped) and closed
   before the next; output tensors are written as they are produced into pre-planned output shards whose
   headers are known up front, so at most one converted tensor is held in memory (plus the few source tensors
   of a recipe that straddles two shards). Peak resident memory stays near the largest source shard.
4. Everything is written into a temporary sibling directory renamed into place at the end.
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .checkpoint import atomic_dir
from .config import AdapterConfig, DecoderConfig, ModelConfig, VisionConfig
from .errors import EdgemmError, UnsupportedVariant

FAMILIES = ("cogvlm", "llava", "libra")
DEFAULT_SHARD_BYTES = 2 * 1024 ** 3
# A memory-mapped shard's pages count as resident once touched: the mapping is dropped and re-opened after this
# many bytes were read from it, so resident memory stays bounded even for shards larger than RAM.
REMAP_BYTES = 256 * 1024 ** 2
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


# --------------------------------------------------------------------------- plan
@dataclass
class Entry:
    name: str                                   # edgemm state-dict name
    sources: tuple[str, ...]                    # source tensor names (empty: synthesized)
    fn: Callable | None = None                  # list of source tensors -> tensor; None: the one source as is

    def build(self, tensors):
        return tensors[0] if self.fn is None else self.fn(tensors)


@dataclass
class Plan:
    cfg: ModelConfig
    entries: list[Entry] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)      # source name -> why it is not imported
    notes: list[str] = field(default_factory=list)

    def add(self, name, *sources, fn=None):
        self.entries.append(Entry(name, tuple(sources), fn))

    def ignore(self, name, reason):
        self.ignored[name] = reason


def _cat(ts):
    import torch
    return torch.cat(list(ts), 0)


# --------------------------------------------------------------------------- source
class Source:
    """The tensors of a HF checkpoint directory: names, shapes, dtypes and which shard holds each."""

    def __init__(self, path: Path):
        self.path = path
        self.where: dict[str, str] = {}
        self.shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, str] = {}
        self.kind = "safetensors"
        p = path
        if (p / "model.safetensors.index.json").is_file():
            wm = self._index(p / "model.safetensors.index.json")
        elif (p / "model.safetensors").is_file():
            wm = None
            self.shards = ["model.safetensors"]
        elif (p / "pytorch_model.bin.index.json").is_file():
            wm, self.kind = self._index(p / "pytorch_model.bin.index.json"), "bin"
        elif (p / "pytorch_model.bin").is_file():
            wm, self.kind, self.shards = None, "bin", ["pytorch_model.bin"]
        else:
            raise EdgemmError(f"{p} holds no weights: expected model.safetensors(.index.json) or "
                              "pytorch_model.bin(.index.json)")
        if wm is not None:
            self.shards = list(dict.fromkeys(wm[k] for k in sorted(wm, key=lambda k: (wm[k], k))))
            for shard in self.shards:
                if not (p / shard).is_file():
                    example = next(k for k, v in wm.items() if v == shard)
                    raise EdgemmError(f"shard {shard} is missing from {p} (it holds tensor {example}, among others)")
        for shard in self.shards:
            with self.open(shard) as f:
                for k in f.keys():
                    if wm is not None and wm.get(k) != shard:
                        if k not in wm:
                            raise EdgemmError(f"tensor {k} is in shard {shard} but not in the index")
                        continue
                    self.where[k] = shard
                    self.shapes[k], self.dtypes[k] = f.shape(k), f.dtype(k)
        if wm is not None:
            for k, shard in wm.items():
                if k not in self.where:
                    raise EdgemmError(f"tensor {k} is missing: the index puts it in {shard}, which lacks it")

    @staticmethod
    def _index(path: Path) -> dict:
        try:
            wm = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise EdgemmError(f"{path} is not a valid checkpoint index ({e})") from None
        return wm

    def open(self, shard: str) -> "_Shard":
        return _Shard(self.path / shard, self.kind)

    def read(self, name: str):
        """One tensor (small reads while planning, e.g. checking that a bias is all zeros)."""
        with self.open(self.where[name]) as f:
            return f.get(name)


class _Shard:
    """A context manager over one shard: safe_open (memory-mapped) or a weights-only mmapped torch.load."""

    def __init__(self, path: Path, kind: str):
        self.path, self.kind = path, kind
        self.touched = 0

    def __enter__(self):
        if self.kind == "safetensors":
            from safetensors import safe_open
            try:
                self.f = safe_open(str(self.path), framework="pt")
            except Exception as e:
                raise EdgemmError(f"{self.path} is not a readable safetensors file ({e})") from None
        else:
            import torch
            try:
                self.d = torch.load(str(self.path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise EdgemmError(f"{self.path} cannot be read with torch.load(weights_only=True) ({e})") from None
        return self

    def __exit__(self, *exc):
        self.f = self.d = None      # drops the mapping

    def keys(self):
        return list(self.f.keys()) if self.kind == "safetensors" else list(self.d)

    def shape(self, k):
        return tuple(self.f.get_slice(k).get_shape()) if self.kind == "safetensors" else tuple(self.d[k].shape)

    def dtype(self, k):
        if self.kind == "safetensors":
            return _ST_DTYPES.get(self.f.get_slice(k).get_dtype(), self.f.get_slice(k).get_dtype())
        return str(self.d[k].dtype).replace("torch.", "")

    def get(self, k):
        if self.kind != "safetensors":
            return self.d[k]
        t = self.f.get_tensor(k)
        self.touched += t.numel() * t.element_size()
        if self.touched > REMAP_BYTES:            # drop the touched pages of the mapping: map it afresh
            self.f, self.touched = None, 0
            self.__enter__()
        return t


# --------------------------------------------------------------------------- families
def detect_family(hf: dict, where: str = "config.json") -> str:
    mt = str(hf.get("model_type", "")).lower()
    arch = " ".join(hf.get("architectures") or []).lower()
    auto = json.dumps(hf.get("auto_map") or {}).lower()
    if mt == "llava" or "llavaforconditionalgeneration" in arch:
        return "llava"
    if mt == "libra" or "libraforcausallm" in arch:
        return "libra"
    if mt == "cogvlm" or "cogvlm" in arch or "cogvlm" in auto:
        return "cogvlm"
    raise EdgemmError(f"cannot tell the model family from {where} (model_type={mt or None!r}, "
                      f"architectures={hf.get('architectures')}); edgemm imports {', '.join(FAMILIES)}: "
                      "pass --from if it is one of them")


def _req(d: dict, key: str, where: str):
    if key not in d:
        raise EdgemmError(f"{where} lacks the key {key!r}")
    return d[key]


def _act(name: str, where: str) -> str:
    forms = {"gelu": "erf", "gelu_python": "erf", "gelu_pytorch_tanh": "tanh", "gelu_new": "tanh",
             "gelu_fast": "tanh", "quick_gelu": "quick"}
    if name not in forms:
        raise EdgemmError(f"{where}: activation {name!r} is not supported (edgemm computes gelu, "
                          "its tanh form and quick_gelu)")
    return forms[name]


def _rope_theta(tc: dict, where: str) -> float:
    rp = tc.get("rope_parameters") or {}
    scaling = tc.get("rope_scaling")
    rtype = rp.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
    if rtype != "default":
        raise EdgemmError(f"{where}: RoPE scaling {rtype!r} is not supported (plain RoPE only)")
    return float(rp.get("rope_theta", tc.get("rope_theta", 10000.0)))


def _llama_layer(plan: Plan, pre: str, i: int, qkv_bias: bool, synth_qkv_bias=None):
    e, s = f"decoder.layers.{i}.", f"{pre}layers.{i}."
    plan.add(e + "attn_norm.weight", s + "input_layernorm.weight")
    plan.add(e + "ffn_norm.weight", s + "post_attention_layernorm.weight")
    a = s + "self_attn."
    plan.add(e + "text.qkv.weight", a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight", fn=_cat)
    if qkv_bias:
        plan.add(e + "text.qkv.bias", a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias", fn=_cat)
    plan.add(e + "text.o.weight", a + "o_proj.weight")
    for n in ("gate", "up", "down"):
        plan.add(e + f"text.{n}.weight", s + f"mlp.{n}_proj.weight")
    plan.ignore(a + "rotary_emb.inv_freq", "RoPE frequencies (recomputed from the config's rope_theta)")


def map_cogvlm(hf: dict, src: Source, rules: str = "original") -> Plan:
    """THUDM/cogvlm-chat-hf: EVA2-CLIP-E + GLU adapter + Vicuna with visual experts."""
    w = "config.json"
    v = _req(hf, "vision_config", w)
    wv = "config.json vision_config"
    D, L = _req(hf, "hidden_size", w), _req(hf, "num_hidden_layers", w)
    vl, image, patch = _req(v, "num_hidden_layers", wv), _req(v, "image_size", wv), _req(v, "patch_size", wv)
    if hf.get("num_multi_query_heads") or hf.get("num_key_value_heads", _req(hf, "num_attention_heads", w)) \
            != hf["num_attention_heads"]:
        raise EdgemmError("this CogVLM config uses grouped-query attention, which the cogvlm-chat-hf layout "
                          "(fused language/vision expert QKV of 3*hidden_size) does not have")
    if v.get("num_positions", (image // patch) ** 2 + 1) != (image // patch) ** 2 + 1:
        raise EdgemmError(f"{wv}: num_positions {v['num_positions']} != (image_size/patch_size)^2 + 1")
    bias_names = [f"model.layers.{i}.self_attn.vision_expert_query_key_value.bias" for i in range(L)]
    present = [n for n in bias_names if n in src.where]
    qkv_bias = bool(present)
    notes = []
    if present and all(not src.read(n).any() for n in present):
        qkv_bias = False
        notes.append("the vision expert QKV bias is all zeros: imported as no bias (exact)")
    if rules not in ("original", "llamacpp"):
        raise EdgemmError(f"unknown cogvlm rules {rules!r}: 'original' or 'llamacpp'")
    cfg = ModelConfig(
        name=src.path.name,
        vision=VisionConfig(image_size=image, patch_size=patch, width=_req(v, "hidden_size", wv), layers=vl,
                            heads=_req(v, "num_heads", wv), mlp_dim=_req(v, "intermediate_size", wv),
                            eps=v.get("layer_norm_eps", 1e-6), gelu=_act(v.get("hidden_act", "gelu"), wv),
                            image_mean=CLIP_MEAN, image_std=CLIP_STD),
        adapter=AdapterConfig(ffn_dim=_req(hf, "intermediate_size", w), eps=1e-5, gelu="erf"),
        decoder=DecoderConfig(vocab_size=_req(hf, "vocab_size", w), d_model=D, n_layers=L,
                              n_heads=hf["num_attention_heads"], ffn_dim=hf["intermediate_size"],
                              rope_theta=_rope_theta(hf, w), rms_eps=hf.get("rms_norm_eps", 1e-5),
                              max_seq_len=hf.get("max_position_embeddings", 2048),
                              tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=qkv_bias,
                              position_rule="cogvlm" if rules == "original" else "sequential",
                              eoi_branch="text" if rules == "original" else "vision"))
    plan = Plan(cfg, notes=notes)
    plan.add("decoder.tok_embeddings.weight", "model.embed_tokens.weight")
    plan.add("decoder.norm.weight", "model.norm.weight")
    if cfg.decoder.tie_embeddings:
        plan.ignore("lm_head.weight", "tied to the token embedding")
    else:
        plan.add("decoder.lm_head.weight", "lm_head.weight")
    for i in range(L):
        e, s = f"decoder.layers.{i}.", f"model.layers.{i}."
        plan.add(e + "attn_norm.weight", s + "input_layernorm.weight")
        plan.add(e + "ffn_norm.weight", s + "post_attention_layernorm.weight")
        plan.ignore(s + "self_attn.rotary_emb.inv_freq", "RoPE frequencies (recomputed from rope_theta)")
        for br, ex in (("text", "language"), ("vision", "vision")):
            a = f"{s}self_attn.{ex}_expert_"
            plan.add(e + f"{br}.qkv.weight", a + "query_key_value.weight")
            bias = a + "query_key_value.bias"
            if qkv_bias:
                if bias in src.where:
                    plan.add(e + f"{br}.qkv.bias", bias)
                else:   # cogvlm-chat-hf: only the vision expert has a QKV bias
                    n = 3 * D
                    plan.add(e + f"{br}.qkv.bias", fn=lambda _, n=n: _zeros(n))
            elif bias in src.where:
                plan.ignore(bias, "all zeros")
            plan.add(e + f"{br}.o.weight", a + "dense.weight")
            for n in ("gate", "up", "down"):
                plan.add(e + f"{br}.{n}.weight", f"{s}mlp.{ex}_mlp.{n}_proj.weight")
    vp = "model.vision."
    pe = vp + "patch_embedding."
    plan.add("vision.patch_embed.weight", pe + "proj.weight")
    plan.add("vision.patch_embed.bias", pe + "proj.bias")
    plan.add("vision.cls", pe + "cls_embedding", fn=lambda t: t[0].reshape(1, 1, -1))
    # HF puts CLS first; edgemm (like llama.cpp) appends it after the patches: attention without a mask is
    # permutation-equivariant, so moving the CLS row of the position table to the end is exact.
    plan.add("vision.pos", pe + "position_embedding.weight",
             fn=lambda t: _cat([t[0][1:], t[0][:1]]).unsqueeze(0))
    for i in range(vl):
        e, s = f"vision.blocks.{i}.", f"{vp}transformer.layers.{i}."
        for en, sn in (("qkv", "attention.query_key_value"), ("proj", "attention.dense"), ("fc1", "mlp.fc1"),
                       ("fc2", "mlp.fc2"), ("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")):
            plan.add(e + en + ".weight", s + sn + ".weight")
            plan.add(e + en + ".bias", s + sn + ".bias")
    g = vp + "linear_proj."
    for en, sn in (("linear_proj", "linear_proj"), ("gate", "gate_proj"), ("up", "dense_h_to_4h"),
                   ("down", "dense_4h_to_h")):
        plan.add(f"adapter.{en}.weight", g + sn + ".weight")
    plan.add("adapter.norm.weight", g + "norm1.weight")
    plan.add("adapter.norm.bias", g + "norm1.bias")
    plan.add("adapter.boi", vp + "boi")
    plan.add("adapter.eoi", vp + "eoi")
    return plan


def _zeros(n):
    import torch
    return torch.zeros(n)


def map_llava(hf: dict, src: Source, rules: str = "original") -> Plan:
    """transformers' LlavaForConditionalGeneration (4.x and 5.x layouts): CLIP tower + MLP projector + LLaMA."""
    w = "config.json"
    tc, vc = _req(hf, "text_config", w), _req(hf, "vision_config", w)
    wt, wv = "config.json text_config", "config.json vision_config"
    tmt, vmt = tc.get("model_type", "llama"), vc.get("model_type", "clip_vision_model")
    if tmt not in ("llama", "mistral", "qwen2"):
        raise EdgemmError(f"{wt}: language model {tmt!r} is not supported (llama, mistral, qwen2)")
    if vmt != "clip_vision_model":
        raise EdgemmError(f"{wv}: vision tower {vmt!r} is not supported (clip_vision_model)")
    if tc.get("mlp_bias"):
        raise EdgemmError(f"{wt}: mlp_bias is not supported")
    if tmt == "llama" and tc.get("attention_bias"):
        raise EdgemmError(f"{wt}: attention_bias (which biases o_proj too) is not supported")
    if tmt == "mistral" and tc.get("sliding_window") not in (None, 0) and \
            tc["sliding_window"] < tc.get("max_position_embeddings", 0):
        raise EdgemmError(f"{wt}: sliding-window attention is not supported")
    D, H, L = _req(tc, "hidden_size", wt), _req(tc, "num_attention_heads", wt), _req(tc, "num_hidden_layers", wt)
    if tc.get("head_dim") not in (None, D // H):
        raise EdgemmError(f"{wt}: head_dim {tc['head_dim']} != hidden_size / num_attention_heads")
    kv = tc.get("num_key_value_heads") or H
    fl = hf.get("vision_feature_layer", -2)
    if not isinstance(fl, int):
        raise EdgemmError(f"{w}: vision_feature_layer {fl!r} (several layers) is not supported")
    vl = _req(vc, "num_hidden_layers", wv)
    used = vl + 1 + fl if fl < 0 else fl
    if not 0 <= used <= vl:
        raise EdgemmError(f"{w}: vision_feature_layer {fl} is out of range for {vl} layers")
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise EdgemmError(f"{w}: vision_feature_select_strategy {strategy!r} is not supported")
    tie = bool(hf.get("tie_word_embeddings", tc.get("tie_word_embeddings", False)))
    qkv_bias = tmt == "qwen2"
    cfg = ModelConfig(
        name=src.path.name,
        vision=VisionConfig(image_size=_req(vc, "image_size", wv), patch_size=_req(vc, "patch_size", wv),
                            width=_req(vc, "hidden_size", wv), layers=vl, heads=_req(vc, "num_attention_heads", wv),
                            mlp_dim=_req(vc, "intermediate_size", wv), eps=vc.get("layer_norm_eps", 1e-5),
                            gelu=_act(vc.get("hidden_act", "quick_gelu"), wv), image_mean=CLIP_MEAN,
                            image_std=CLIP_STD, arch="clip", feature_layer=used, keep_cls=strategy == "full"),
        adapter=AdapterConfig(kind="mlp", gelu=_act(hf.get("projector_hidden_act", "gelu"), w),
                              bias=bool(hf.get("multimodal_projector_bias", True))),
        decoder=DecoderConfig(vocab_size=_req(tc, "vocab_size", wt), d_model=D, n_layers=L, n_heads=H,
                              n_kv_heads=kv if kv != H else None, ffn_dim=_req(tc, "intermediate_size", wt),
                              rope_theta=_rope_theta(tc, wt), rms_eps=tc.get("rms_norm_eps", 1e-6),
                              max_seq_len=tc.get("max_position_embeddings", 4096), tie_embeddings=tie,
                              qkv_bias=qkv_bias, single_branch=True))
    if tc.get("hidden_act", "silu") != "silu":
        raise EdgemmError(f"{wt}: hidden_act {tc['hidden_act']!r} is not supported (silu)")
    # transformers 4.x before 4.52, 4.52+, and 5.x's save format (vision tower without `vision_model.`)
    names = set(src.where)

    def pick(cands, suffix):
        return next((c for c in cands if c + suffix in names), cands[0])
    lm = pick(("model.language_model.", "language_model.model."), "embed_tokens.weight")
    vt = pick(("model.vision_tower.vision_model.", "vision_tower.vision_model.", "model.vision_tower.",
               "vision_tower."), "embeddings.patch_embedding.weight")
    pj = pick(("model.multi_modal_projector.", "multi_modal_projector."), "linear_1.weight")
    head = "language_model.lm_head.weight" if "language_model.lm_head.weight" in names else "lm_head.weight"
    plan = Plan(cfg)
    plan.add("decoder.tok_embeddings.weight", lm + "embed_tokens.weight")
    plan.add("decoder.norm.weight", lm + "norm.weight")
    if tie:
        plan.ignore(head, "tied to the token embedding")
    else:
        plan.add("decoder.lm_head.weight", head)
    for i in range(L):
        _llama_layer(plan, lm, i, qkv_bias)
    em = vt + "embeddings."
    plan.add("vision.patch_embed.weight", em + "patch_embedding.weight")
    plan.add("vision.cls", em + "class_embedding", fn=lambda t: t[0].reshape(1, 1, -1))
    plan.add("vision.pos", em + "position_embedding.weight", fn=lambda t: t[0].unsqueeze(0))
    plan.ignore(em + "position_ids", "position index buffer")
    for n in ("weight", "bias"):
        plan.add(f"vision.pre_norm.{n}", vt + f"pre_layrnorm.{n}")
        plan.ignore(vt + f"post_layernorm.{n}", "CLIP's pooled-output norm: LLaVA takes hidden states before it")
    for i in range(vl):
        s = f"{vt}encoder.layers.{i}."
        if i >= used:
            for k in src.where:
                if k.startswith(s):
                    plan.ignore(k, f"CLIP layer after vision_feature_layer {fl}: LLaVA does not use it")
            continue
        e = f"vision.blocks.{i}."
        a = s + "self_attn."
        for n in ("weight", "bias"):
            plan.add(e + f"qkv.{n}", a + f"q_proj.{n}", a + f"k_proj.{n}", a + f"v_proj.{n}", fn=_cat)
            plan.add(e + f"proj.{n}", a + f"out_proj.{n}")
            plan.add(e + f"ln1.{n}", s + f"layer_norm1.{n}")
            plan.add(e + f"ln2.{n}", s + f"layer_norm2.{n}")
            plan.add(e + f"fc1.{n}", s + f"mlp.fc1.{n}")
            plan.add(e + f"fc2.{n}", s + f"mlp.fc2.{n}")
    for n in ("linear_1", "linear_2"):
        plan.add(f"adapter.{n}.weight", pj + f"{n}.weight")
        if cfg.adapter.bias:
            plan.add(f"adapter.{n}.bias", pj + f"{n}.bias")
    plan.notes.append(f"image token id {hf.get('image_token_index', hf.get('image_token_id'))}: its rows are "
                      f"replaced by the {cfg.n_image_rows} image rows of the vision stage")
    return plan


def map_libra(hf: dict, src: Source, rules: str = "original") -> Plan:
    """YifanXu74/Libra's LibraForCausalLM: LLaMA text branch, low-rank vision branches (LibraLinear weight_A /
    weight_B), per-modality norms (input, post-attention, final), the rank-r cross-modal K/V bridge, and the
    image-token input embeddings. Libra's VQ image tokenizer and CLIP signal encoder are separate models."""
    w = "config.json"
    for key, bad in (("use_2d_rope", True), ("addition_mode", True)):
        if hf.get(key, False) == bad:
            raise UnsupportedVariant(f"libra {key}", "edgemm's reference model",
                                     "none (edgemm implements Libra's released setting: 1-D RoPE, routed branches)")
    D, H, L = _req(hf, "hidden_size", w), _req(hf, "num_attention_heads", w), _req(hf, "num_hidden_layers", w)
    if hf.get("num_key_value_heads", H) != H:
        raise EdgemmError(f"{w}: Libra's vision branches are multi-head; num_key_value_heads != num_attention_heads")
    res = _req(hf, "image_feature_resolution", w)
    mvt = hf.get("max_vision_token_length", res * res + 2)
    if mvt != res * res + 2:
        raise EdgemmError(f"{w}: max_vision_token_length {mvt} != image_feature_resolution^2 + 2")
    ratio = hf.get("vision_down_ratio", 4)
    bridge = hf.get("bridge_rank", 8) if hf.get("use_bridge", True) else None
    ncb = hf.get("vision_codebook_num", 2)
    if hf.get("hidden_act", "silu") != "silu":
        raise EdgemmError(f"{w}: hidden_act {hf['hidden_act']!r} is not supported (silu)")
    cfg = ModelConfig(
        name=src.path.name,
        vision=VisionConfig(image_size=res, patch_size=1, width=D, layers=0, heads=1, mlp_dim=1, arch="none"),
        adapter=AdapterConfig(kind="libra", codebooks=ncb, vision_vocab=hf.get("vision_vocab_size", 514),
                              signal_size=hf.get("contiguous_signal_size", 2048),
                              concat_signals=hf.get("concat_signals", True), norm_signals=hf.get("norm_signals", True),
                              position_embedding=mvt if hf.get("use_vision_position_embedding") else 0),
        decoder=DecoderConfig(vocab_size=_req(hf, "vocab_size", w), d_model=D, n_layers=L, n_heads=H,
                              ffn_dim=_req(hf, "intermediate_size", w), rope_theta=_rope_theta(hf, w),
                              rms_eps=hf.get("rms_norm_eps", 1e-6), max_seq_len=hf.get("max_position_embeddings", 2048),
                              tie_embeddings=bool(hf.get("tie_word_embeddings", False)), vision_down_ratio=ratio,
                              per_modality_norms=True, cross_modal_bridge=bridge))
    plan = Plan(cfg)
    m = "model."
    plan.add("decoder.tok_embeddings.weight", m + "embed_tokens.weight")
    plan.add("decoder.norm.weight", m + "norm.weight")
    plan.add("decoder.vision_norm.weight", m + "vision_norm.weight")
    if cfg.decoder.tie_embeddings:
        plan.ignore("lm_head.weight", "tied to the token embedding")
    else:
        plan.add("decoder.lm_head.weight", "lm_head.weight")
    for i in range(L):
        _llama_layer(plan, m, i, False)
        e, s = f"decoder.layers.{i}.", f"{m}layers.{i}."
        plan.add(e + "vision_attn_norm.weight", s + "vision_input_layernorm.weight")
        plan.add(e + "vision_ffn_norm.weight", s + "vision_post_attention_layernorm.weight")
        for n in ("q", "k", "v", "o"):
            for ab in ("A", "B"):
                plan.add(e + f"vision.{n}.weight_{ab}", s + f"self_attn.vision_{n}_proj.weight_{ab}")
        for n in ("gate", "up", "down"):
            for ab in ("A", "B"):
                plan.add(e + f"vision.{n}.weight_{ab}", s + f"mlp.vision_{n}_proj.weight_{ab}")
        if bridge:
            for kv in ("k", "v"):
                for br, on in (("text", "language"), ("vision", "vision")):
                    for ab in ("A", "B"):
                        plan.add(e + f"{br}.{kv}_bridge.weight_{ab}",
                                 s + f"self_attn.vision_{kv}_bridge_on_{on}.weight_{ab}")
    for i in range(ncb):
        plan.add(f"adapter.embed.{i}.weight", m + f"vision_embed_tokens.{i}.weight")
    if cfg.adapter.position_embedding:
        plan.add("adapter.pos.weight", m + "vision_position_embedding.weight")
    if cfg.adapter.signal_size:
        if cfg.adapter.concat_signals and cfg.adapter.norm_signals:
            plan.add("adapter.signal_norm.weight", m + "vision_signal_norm.weight")
        plan.add("adapter.processor.weight", m + "vision_contiguous_signal_processor.weight")
    why = "image-token prediction head (edgemm generates text; image generation is not imported)"
    for k in src.where:
        if k.startswith("vision_lm_head.") or k == "vision_hidden_placeholder":
            plan.ignore(k, why)
    for k in ("naive_placeholder", "vision_logits_placeholder", "language_logits_placeholder",
              "eoi_to_newline_logits_placeholder", m + "pos_offset"):
        plan.ignore(k, "constant buffer")
    plan.notes.append("Libra's pixel path (its VQ image tokenizer and CLIP continuous-signal encoder, separate "
                      "models) is not imported: image rows come from EdgeMM.encode_image_tokens(codes, signal)")
    return plan


MAPPERS = {"cogvlm": map_cogvlm, "llava": map_llava, "libra": map_libra}


# --------------------------------------------------------------------------- checks
def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    import torch
    from .model import EdgeMM
    with torch.device("meta"):
        m = EdgeMM(cfg)
    out = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    if cfg.decoder.tie_embeddings:
        out.pop("decoder.lm_head.weight", None)
    return out


def check_plan(plan: Plan, src: Source) -> dict[str, tuple]:
    """Unexpected / missing tensors and shapes, before anything is written. -> edgemm name: shape."""
    import torch
    used = {s for e in plan.entries for s in e.sources}
    for e in plan.entries:
        for s in e.sources:
            if s not in src.where:
                raise EdgemmError(f"tensor {s} is missing from the checkpoint (edgemm's {e.name} is made from it)")
    unexpected = sorted(set(src.where) - used - set(plan.ignored))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise EdgemmError(f"unexpected tensor {unexpected[0]}{more}: not part of the {plan.cfg.name!r} layout "
                          "that config.json describes")
    expected = _expected_shapes(plan.cfg)
    names = [e.name for e in plan.entries]
    if len(set(names)) != len(names):
        raise EdgemmError("internal: the import plan writes a tensor twice")
    missing = sorted(set(expected) - set(names))
    if missing:
        raise EdgemmError(f"no source tensor for edgemm's {missing[0]}: the checkpoint lacks part of the model")
    shapes = {}
    for e in plan.entries:
        if e.name not in expected:
            raise EdgemmError(f"internal: the import plan writes {e.name}, which the model does not have")
        metas = [torch.empty(src.shapes[s], device="meta") for s in e.sources]
        desc = ", ".join(f"{s} {tuple(src.shapes[s])}" for s in e.sources)
        try:
            got = tuple(e.build(metas).shape) if e.sources else expected[e.name]
        except Exception:
            got = None
        if got != expected[e.name]:
            if len(e.sources) == 1:
                raise EdgemmError(f"tensor {e.sources[0]} has shape {tuple(src.shapes[e.sources[0]])}; config.json "
                                  f"implies {expected[e.name]} for edgemm's {e.name}")
            raise EdgemmError(f"tensors {desc} do not make edgemm's {e.name} of shape {expected[e.name]} "
                              "that config.json implies")
        shapes[e.name] = got
    return shapes


# --------------------------------------------------------------------------- streaming writer
class ShardedWriter:
    """Pre-planned safetensors shards written tensor by tensor (headers first, so nothing is buffered)."""

    def __init__(self, out: Path, order: list[str], shapes: dict, shard_bytes: int):
        self.out, self.shapes = out, shapes
        self.shards: list[list[str]] = [[]]
        size = 0
        for n in order:
            nb = 4 * _numel(shapes[n])
            if self.shards[-1] and size + nb > shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(n)
            size += nb
        k = len(self.shards)
        self.files = ["model.safetensors"] if k == 1 else \
            [f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
        self.total = sum(4 * _numel(s) for s in shapes.values())
        self._i, self._j, self._f = 0, 0, None

    def _open(self):
        names = self.shards[self._i]
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for n in names:
            nb = 4 * _numel(self.shapes[n])
            header[n] = {"dtype": "F32", "shape": list(self.shapes[n]), "data_offsets": [off, off + nb]}
            off += nb
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        self._f = open(self.out / self.files[self._i], "wb")
        self._f.write(struct.pack("<Q", len(h)) + h)

    def write(self, name: str, t) -> None:
        import torch
        if self._f is None:
            self._open()
        want = self.shards[self._i][self._j]
        if name != want:
            raise RuntimeError(f"internal: writer expected {want}, got {name}")
        t = t.detach().to(torch.float32).contiguous()
        if tuple(t.shape) != tuple(self.shapes[name]):
            raise EdgemmError(f"tensor {name}: converted shape {tuple(t.shape)} != {self.shapes[name]}")
        if t.numel():
            self._f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._j += 1
        if self._j == len(self.shards[self._i]):
            self._f.close()
            self._f, self._i, self._j = None, self._i + 1, 0

    def finish(self) -> list[str]:
        if self._i != len(self.shards):
            raise RuntimeError("internal: not every planned tensor was written")
        if len(self.files) > 1:
            wm = {n: f for f, names in zip(self.files, self.shards) for n in names}
            (self.out / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": self.total}, "weight_map": wm}, indent=2) + "\n")
        return self.files


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def stream_convert(plan: Plan, src: Source, shapes: dict, out_dir: Path, shard_bytes: int, log=None) -> list[str]:
    """Source shards one at a time; every entry is built and written as soon as its last source shard is open."""
    shard_ix = {s: i for i, s in enumerate(src.shards)}
    ready = {e.name: max((shard_ix[src.where[s]] for s in e.sources), default=0) for e in plan.entries}
    entries = sorted(plan.entries, key=lambda e: ready[e.name])           # stable: plan order within a shard
    writer = ShardedWriter(out_dir, [e.name for e in entries], shapes, shard_bytes)
    need_later: dict[int, set] = {}
    for e in entries:
        for s in e.sources:
            i = shard_ix[src.where[s]]
            if i < ready[e.name]:
                need_later.setdefault(i, set()).add(s)
    pending: dict[str, object] = {}
    k = 0
    for i, shard in enumerate(src.shards):
        with src.open(shard) as f:
            for s in sorted(need_later.get(i, ())):
                pending[s] = f.get(s).clone()          # a recipe straddling shards: keep only its own pieces
            while k < len(entries) and ready[entries[k].name] == i:
                e = entries[k]
                ts = [pending.pop(s) if s in pending else f.get(s) for s in e.sources]
                writer.write(e.name, e.build(ts))
                del ts
                k += 1
        if log:
            log(f"  {shard}: done ({i + 1}/{len(src.shards)})")
    return writer.finish()


# --------------------------------------------------------------------------- tokenizer
def _install_tokenizer(src: Path, tok_dir: Path | None, out: Path, log) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from .tokenizer import BOS, CHAT_TEMPLATE, EOS, PAD, Tokenizer
    d = tok_dir or src
    f = d / "tokenizer.json"
    if not f.is_file():
        if tok_dir is None:
            raise EdgemmError(f"{src} ships no tokenizer.json; pass --tokenizer DIR (a directory with the model's "
                              "tokenizer.json, e.g. the Vicuna/LLaMA tokenizer for cogvlm-chat-hf)")
        raise EdgemmError(f"--tokenizer {tok_dir}: no tokenizer.json there")
    try:
        tok = HFTokenizer.from_file(str(f))
    except Exception as e:
        raise EdgemmError(f"cannot read tokenizer {f}: {e}") from None
    missing = [t for t in (BOS, EOS) if tok.token_to_id(t) is None]
    if missing:
        raise EdgemmError(f"{f} lacks {' and '.join(missing)}, which edgemm's prompt format needs")
    if tok.token_to_id(PAD) is None:
        tok.add_special_tokens([PAD])
        log(f"note: the tokenizer has no {PAD}; added it as id {tok.token_to_id(PAD)} (used for padding only)")
    Tokenizer(tok).save(out / "tokenizer.json")
    template = None
    for cand in (d / "chat_template.jinja", src / "chat_template.jinja"):
        if cand.is_file():
            template = cand.read_text()
            break
    if template is None:
        for cand in (d / "tokenizer_config.json", src / "tokenizer_config.json"):
            if cand.is_file():
                t = json.loads(cand.read_text()).get("chat_template")
                if isinstance(t, str):
                    template = t
                    break
    (out / "chat_template.jinja").write_text(template or CHAT_TEMPLATE)


# --------------------------------------------------------------------------- entry point
def import_checkpoint(src, out, family: str = "auto", tokenizer=None, force: bool = False, rules: str = "original",
                      shard_bytes: int = DEFAULT_SHARD_BYTES, log=print) -> dict:
    """Import a HF-layout checkpoint directory into an edgemm checkpoint at `out`. -> a summary dict."""
    log = log or (lambda *_: None)
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise EdgemmError(f"{src} is not a directory")
    if not (src / "config.json").is_file():
        raise EdgemmError(f"{src} is not a Hugging Face checkpoint: config.json is missing")
    if out.exists() and not force:
        raise EdgemmError(f"{out} already exists; choose another -o or pass --force to replace it")
    try:
        hf = json.loads((src / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise EdgemmError(f"{src / 'config.json'} is not valid JSON ({e})") from None
    fam = detect_family(hf, str(src / "config.json")) if family == "auto" else family
    if fam not in MAPPERS:
        raise EdgemmError(f"unknown family {family!r}; edgemm imports {', '.join(FAMILIES)}")
    source = Source(src)
    plan = MAPPERS[fam](hf, source, rules)
    plan.cfg.validate()
    shapes = check_plan(plan, source)
    tok_dir = Path(tokenizer) if tokenizer else None
    log(f"importing {src} as {fam}: {len(plan.entries)} edgemm tensors from {len(source.where)} source tensors "
        f"in {len(source.shards)} shard(s)")
    for n in plan.notes:
        log(f"note: {n}")
    reasons: dict[str, int] = {}
    for k, why in plan.ignored.items():
        if k in source.where:
            reasons[why] = reasons.get(why, 0) + 1
    for why, n in reasons.items():
        log(f"not imported: {n} tensor(s): {why}")
    with atomic_dir(out) as tmp:
        _install_tokenizer(src, tok_dir, tmp, log)
        files = stream_convert(plan, source, shapes, tmp, shard_bytes, log)
        plan.cfg.save(tmp / "config.json")
        summary = {"source": str(src.resolve()), "family": fam, "rules": rules if fam == "cogvlm" else None,
                   "variants": plan.cfg.variants(), "files": files, "tensors": len(plan.entries),
                   "not_imported": {k: v for k, v in plan.ignored.items() if k in source.where},
                   "notes": plan.notes}
        (tmp / "edgemm-import.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"wrote {out} ({len(files)} weight file(s)); variants: {', '.join(plan.cfg.variants()) or 'none'}")
    return summary


def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", str(s).lower())
    if not m:
        raise EdgemmError(f"cannot read the size {s!r} (e.g. 2GB, 500MB)")
    unit = m.group(2).rstrip("b").rstrip("i")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(unit or " "))
