"""Fuyu (adept/fuyu-8b; OtterHD is the same architecture): transformers' FuyuForCausalLM, model_type "fuyu" -> edgemm.

- no vision encoder: an image of any size (FuyuImageProcessor: downscaled to fit `size`, padded to whole patches)
  is cut into patch_size x patch_size pixel patches, each through one Linear (vision_embed_tokens) -> edgemm's
  patch_linear front end (edgemm.blocks.vision.PatchLinear); the processor writes `|SPEAKER|` per patch and
  `|NEWLINE|` after each row of patches, and the model puts the patch rows at the `|SPEAKER|` positions: the
  newline_rows connector holds the `|NEWLINE|` token's embedding row and places it after each row (edgemm.fuyu_patches
  is the host side);
- the language model is Persimmon: LayerNorm with bias, RoPE on the first partial_rotary_factor of each head,
  per-head q/k LayerNorm (qk_layernorm), a squared-ReLU MLP, biases on every linear but the LM head, and a fused
  query_key_value whose rows are per head [q, k, v] (regrouped at import into edgemm's [Q; K; V]);
- the prompt as FuyuProcessor writes it: the image rows, `<s>`, the text, `<0x04>` (its beginning-of-answer token);
  tokenized without a prepended bos (the processor tokenizes with add_special_tokens=False).
"""
from __future__ import annotations

from ..config import AdapterConfig, DecoderConfig, ModelConfig, VisionConfig
from ..errors import EdgemmError
from ..importers.shards import Source
from ..importers.tokenizer import _read_json
from . import Family, register
from .base import Plan, _req, _rope_theta
from .idefics import _token
from .llava import pick

IMAGE_TOKEN, NEWLINE_TOKEN, BOA = "|SPEAKER|", "|NEWLINE|", "<0x04>"
TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "hidden_act", "max_position_embeddings", "layer_norm_eps", "qk_layernorm", "rope_theta", "rope_scaling",
             "rope_parameters", "partial_rotary_factor", "tie_word_embeddings")
BILINEAR = 2                    # PIL's resample code, FuyuImageProcessor's default
# FuyuProcessor's prompt: the image's rows, <s>, the text, <0x04>; an assistant turn ends with eos
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}"
            "{% for p in m['content'] if p['type'] == 'image' %}<image>{% endfor %}<s>"
            "{% for p in m['content'] if p['type'] == 'text' %}{{ p['text'] }}\n{% endfor %}" + BOA +
            "{% elif m['role'] == 'assistant' %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{{ eos_token }}"
            "{% endif %}{% endfor %}")


def text_config(hf: dict) -> dict:
    """Persimmon's settings: text_config (transformers 5), or the flat keys of the released config.json."""
    tc = hf.get("text_config")
    if isinstance(tc, dict) and "hidden_size" in tc:
        return tc
    return {**(tc if isinstance(tc, dict) else {}), **{k: hf[k] for k in TEXT_KEYS if k in hf}}


def decoder_config(hf: dict, tc: dict, wt: str) -> DecoderConfig:
    if tc.get("model_type", "persimmon") != "persimmon":
        raise EdgemmError(f"{wt}: language model {tc['model_type']!r} is not supported (persimmon)")
    if tc.get("hidden_act", "relu2") != "relu2":
        raise EdgemmError(f"{wt}: hidden_act {tc['hidden_act']!r} is not supported (Persimmon's relu2)")
    D, H = _req(tc, "hidden_size", wt), _req(tc, "num_attention_heads", wt)
    if not isinstance(D, int) or not isinstance(H, int) or H < 1 or D % H:
        raise EdgemmError(f"{wt}: hidden_size {D!r} is not a multiple of num_attention_heads {H!r}")
    rp = tc.get("rope_parameters") or {}
    factor = rp.get("partial_rotary_factor", tc.get("partial_rotary_factor", 0.5))
    R = int(D // H * factor) if isinstance(factor, (int, float)) and 0 < factor <= 1 else -1
    if R < 2 or R % 2:
        raise EdgemmError(f"{wt}: partial_rotary_factor {factor!r} does not give an even number of rotated dims "
                          f"of the {D // H} per head")
    tie = bool(hf.get("tie_word_embeddings", tc.get("tie_word_embeddings", False)))
    return DecoderConfig(vocab_size=_req(tc, "vocab_size", wt), d_model=D, n_layers=_req(tc, "num_hidden_layers", wt),
                         n_heads=H, ffn_dim=_req(tc, "intermediate_size", wt), rope_theta=_rope_theta(tc, wt),
                         rms_eps=float(tc.get("layer_norm_eps", 1e-5)),
                         max_seq_len=int(tc.get("max_position_embeddings", 16384)), tie_embeddings=tie,
                         qkv_bias=True, single_branch=True, qk_norm=bool(tc.get("qk_layernorm", True)), norm="layer",
                         rope_dims=R, mlp="relu2", linear_bias=True)


def _size(d, key: str, where: str) -> tuple[int, int]:
    v = d.get(key)
    if isinstance(v, dict) and isinstance(v.get("height"), int) and isinstance(v.get("width"), int):
        return v["height"], v["width"]
    raise EdgemmError(f"{where}: {key} must be {{'height': int, 'width': int}}, not {v!r}")


def _three(x, key: str, where: str) -> tuple:
    t = tuple(float(a) for a in (x if isinstance(x, (list, tuple)) else [x] * 3))
    if len(t) != 3:
        raise EdgemmError(f"{where}: {key} must be one number or three")
    return t


def vision_config(hf: dict, src: Source, D: int) -> VisionConfig:
    """config.json's patch_size and preprocessor_config.json (FuyuImageProcessor) -> the patch_linear front end."""
    w, pw = "config.json", "preprocessor_config.json"
    p = hf.get("patch_size", 30)
    if not isinstance(p, int) or p < 1 or hf.get("num_channels", 3) != 3:
        raise EdgemmError(f"{w}: patch_size {p!r} must be a positive whole number and num_channels 3")
    pc = _read_json(src.path / pw) or {}
    if pc.get("patch_size", {"height": p, "width": p}) != {"height": p, "width": p}:
        raise EdgemmError(f"{pw}: patch_size {pc['patch_size']} differs from config.json's {p} x {p}")
    canvas = _size({"size": {"height": 1080, "width": 1920}, **pc}, "size", pw)
    if canvas[0] % p or canvas[1] % p:
        raise EdgemmError(f"{pw}: size {canvas[0]} x {canvas[1]} is not in whole {p} px patches")
    if any(pc.get(k) is False for k in ("do_resize", "do_pad", "do_normalize", "do_rescale")) or \
            abs(pc.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12 or pc.get("resample", BILINEAR) != BILINEAR or \
            pc.get("padding_mode", "constant") != "constant":
        raise EdgemmError(f"{pw}: do_resize, do_pad, do_rescale or do_normalize off, another rescale_factor, "
                          "resample or padding_mode are not supported")
    return VisionConfig(image_size=p, patch_size=p, width=D, layers=0, heads=1, mlp_dim=1, arch="patch_linear",
                        tiling="fuyu", canvas=list(canvas), pad_value=float(pc.get("padding_value", 1.0)),
                        image_mean=_three(pc.get("image_mean", 0.5), "image_mean", pw),
                        image_std=_three(pc.get("image_std", 0.5), "image_std", pw))


def _qkv(H: int):
    """query_key_value rows per head [q, k, v] (Persimmon's _split_heads) -> edgemm's [Q (all heads); K; V]."""
    def fn(t):
        x = t[0]
        return x.reshape(H, 3, -1, *x.shape[1:]).transpose(0, 1).reshape(x.shape)
    return fn


def map_fuyu(hf: dict, src: Source, rules: str = "original") -> Plan:
    tc = text_config(hf)
    d = decoder_config(hf, tc, "config.json text_config")
    image_id = _token(src, IMAGE_TOKEN, required=False)
    newline_id = _token(src, NEWLINE_TOKEN, required=False)
    if image_id is None or newline_id is None or _token(src, "<s>", required=False) is None:
        raise EdgemmError(f"{src.path / 'tokenizer.json'} lacks {IMAGE_TOKEN}, {NEWLINE_TOKEN} or <s>, the tokens "
                          "FuyuProcessor writes around an image")
    if hf.get("image_token_id", image_id) != image_id or newline_id >= d.vocab_size:
        raise EdgemmError(f"config.json: image_token_id {hf.get('image_token_id')} is not the tokenizer's "
                          f"{IMAGE_TOKEN} ({image_id}), or {NEWLINE_TOKEN} ({newline_id}) is past the vocabulary")
    cfg = ModelConfig(name=src.path.name, vision=vision_config(hf, src, d.d_model),
                      adapter=AdapterConfig(kind="newline_rows"), decoder=d)
    cfg.validate()
    names = set(src.where)
    plan = Plan(cfg)
    lm = pick(names, ("language_model.model.", "model.language_model."), "embed_tokens.weight")
    head = "language_model.lm_head.weight" if "language_model.lm_head.weight" in names else "lm_head.weight"
    vis = pick(names, ("vision_embed_tokens.", "model.vision_embed_tokens."), "weight")
    plan.add("decoder.tok_embeddings.weight", lm + "embed_tokens.weight")
    for n in ("weight", "bias"):
        plan.add(f"decoder.norm.{n}", lm + f"final_layernorm.{n}")
        plan.add(f"vision.patch_embed.{n}", vis + n)
    if d.tie_embeddings:
        plan.ignore(head, "tied to the token embedding")
    else:
        plan.add("decoder.lm_head.weight", head)
    plan.add("adapter.image_newline", lm + "embed_tokens.weight", fn=lambda t: t[0][newline_id].clone())
    for i in range(d.n_layers):
        e, s = f"decoder.layers.{i}.", f"{lm}layers.{i}."
        a = s + "self_attn."
        for n in ("weight", "bias"):
            plan.add(e + f"attn_norm.{n}", s + f"input_layernorm.{n}")
            plan.add(e + f"ffn_norm.{n}", s + f"post_attention_layernorm.{n}")
            plan.add(e + f"text.qkv.{n}", a + f"query_key_value.{n}", fn=_qkv(d.n_heads))
            plan.add(e + f"text.o.{n}", a + f"dense.{n}")
            plan.add(e + f"text.up.{n}", s + f"mlp.dense_h_to_4h.{n}")
            plan.add(e + f"text.down.{n}", s + f"mlp.dense_4h_to_h.{n}")
            if d.qk_norm:
                plan.add(e + f"text.q_norm.{n}", a + f"q_layernorm.{n}")
                plan.add(e + f"text.k_norm.{n}", a + f"k_layernorm.{n}")
        plan.ignore(a + "rotary_emb.inv_freq", "RoPE frequencies (recomputed from the config's rope_theta)")
    v = cfg.vision
    plan.notes.append(f"image token {IMAGE_TOKEN} ({image_id}) per {v.patch_size} px patch, {NEWLINE_TOKEN} "
                      f"({newline_id}) after each row; any size up to {v.canvas[1]} x {v.canvas[0]} px (larger "
                      f"images downscaled): up to {cfg.n_image_rows} rows")
    return plan


@register
class Fuyu(Family):
    name = "fuyu"
    model_types = ("fuyu",)
    architectures = ("fuyuforcausallm",)
    source = "`FuyuForCausalLM` (Fuyu-8B, OtterHD: a Persimmon language model)"
    computes = "no vision encoder: pixel patches through one Linear, a newline row after each patch row, any " \
               "image size; Persimmon decoder (LayerNorm, partial RoPE, q/k LayerNorm, squared ReLU, biases)"
    blocks = ("vision:patch_linear", "connector:newline_rows", "layer:single")
    core = ("single branch (llava)", "qkv bias", "per-head q/k norm", "persimmon decoder (layernorm, partial rope, "
            "relu2 mlp, biases)", "linear patch embedding (fuyu)")

    add_bos = False             # FuyuProcessor tokenizes with add_special_tokens=False: its <s> follows the image
    chat_template = TEMPLATE    # the processor's prompt form (the release ships no chat template)

    def plan(self, hf, src, rules="original"):
        return map_fuyu(hf, src, rules)
