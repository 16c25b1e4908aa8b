"""Qwen-VL (Qwen/Qwen-VL, Qwen-VL-Chat: the released remote code, `QWenLMHeadModel` with `visual.py`) -> edgemm.

The layout (config.json `model_type: qwen` with a `visual` sub-config; tensors under `transformer.`):
- the ViT `transformer.visual.*` (edgemm.blocks.resampler.QwenVisionTower): conv1 (no bias), positional_embedding
  (256 rows, interpolated bicubically to the image's grid at import, as get_abs_pos does on every forward), ln_pre,
  transformer.resblocks.i (ln_1, attn.in_proj: Megatron's per-head [q, k, v] interleave, reordered at import to
  [q; k; v]; attn.out_proj; ln_2; mlp.c_fc / c_proj with nn.GELU (erf)); LayerNorm eps 1e-6; mlp width
  int(width * mlp_ratio);
- the resampler `attn_pool` (query, pos_embed, kv_proj, ln_q, ln_kv, attn: nn.MultiheadAttention), `ln_post` and
  `proj` (x @ proj) -> edgemm.blocks.resampler.QwenResampler: 256 rows an image (n_queries), output_dim // 128 heads;
- the LM: wte, h.i (ln_1 RMSNorm, attn.c_attn: packed [q; k; v] WITH bias, attn.c_proj without, ln_2, mlp: w1, w2,
  c_proj computing c_proj(w1(x) * silu(w2(x))): w2 is the gated one), ln_f, lm_head -> edgemm's single-branch
  decoder with QKV bias (gate = w2, up = w1, down = c_proj, ffn_dim = intermediate_size // 2); NEOX RoPE over every
  head dimension (rotary_pct 1) at rotary_emb_base.

An image is `<img>` + its 256 rows + `</img>` (the release's tokenizer pads the image's path with 256 <imgpad> tokens
and QWenModel.forward overwrites those rows with the resampler's): the stored chat template renders an image as
"Picture N: <img><image></img>\\n" in Qwen-VL-Chat's ChatML (make_context).

The tokenizer: Qwen-VL ships tiktoken ranks (qwen.tiktoken) and no tokenizer.json; `convert_tokenizer` (also
`python -m edgemm.families.qwen_vl SRC OUT`) writes the byte-level BPE tokenizer.json the ranks define (merges
recovered from the ranks, Qwen's split pattern, its special tokens after the ranks: <|endoftext|>, <|im_start|>,
<|im_end|>, 205 <|extra_i|>, then <ref> ... <imgpad>), a tokenizer_config.json (eos <|im_end|>, pad
<|endoftext|>, the chat template); import with `--tokenizer OUT`.

Not computed: dynamic NTK RoPE and log-n attention scaling (use_dynamic_ntk / use_logn_attn), which change nothing
up to `seq_length` tokens: the import caps the context there.
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

from ..config import AdapterConfig, DecoderConfig, ModelConfig, VisionConfig
from ..errors import EdgemmError
from . import Family, register
from .base import CLIP_MEAN, CLIP_STD, Plan, _req

# tokenization_qwen.py: the split pattern and the special tokens, in id order after the ranks
PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
           r"\s+(?!\S)|\s+")
SPECIALS = (("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(f"<|extra_{i}|>" for i in range(205))
            + ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>"))
# Qwen-VL-Chat's make_context (ChatML, a default system turn) and from_list_format's "Picture N: <img>...</img>\n"
MONKEY_WINDOW = 448                 # Monkey's encode: sliding_window(window_size=(448, 448), stride=448)
# Monkey's demo: '<img>{path}</img> {question} Answer: ', one turn, ends with <|endoftext|> (eod)
MONKEY_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<img><image></img>' }}{% else %}{{ ' ' + c['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{ ' Answer: ' }}{% else %}{{ m['content'] }}{{ '<|endoftext|>' }}{% endif %}"
    "{% endfor %}")
TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% set n = namespace(i=0) %}{% for c in m['content'] %}{% if c['type'] == 'image' %}{% set n.i = n.i + 1 %}"
    "{{ 'Picture ' + n.i|string + ': <img><image></img>\\n' }}{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}")


def _in_proj(ts, heads: int):
    """VisualAttention's in_proj ([H, 3, E] rows: each head's q, k, v) -> [q; k; v] (edgemm's fused QKV)."""
    t = ts[0]
    return t.reshape(heads, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def _stack(ts):
    import torch
    return torch.stack(list(ts), 0)


def _table(ts, n: int, batch: bool):
    from ..blocks.resampler import abs_pos
    t = abs_pos(ts[0], n)
    return t[None] if batch else t


def map_qwen_vl(hf: dict, src, rules: str = "original", monkey: bool = False) -> Plan:
    w, vc = "config.json", _req(hf, "visual", "config.json")
    wv = "config.json visual"
    D, H = _req(hf, "hidden_size", w), _req(hf, "num_attention_heads", w)
    E = hf.get("kv_channels", D // H)
    if E * H != D:
        raise EdgemmError(f"{w}: kv_channels {E} x {H} heads != hidden_size {D} (QWenAttention splits c_attn at "
                          "hidden_size)")
    if hf.get("rotary_pct", 1.0) != 1.0:
        raise EdgemmError(f"{w}: rotary_pct {hf['rotary_pct']} is not supported (RoPE over every head dimension)")
    if hf.get("no_bias", True) is not True:
        raise EdgemmError(f"{w}: no_bias false (biases on c_proj and the MLP) is not supported")
    size, patch, width = _req(vc, "image_size", wv), _req(vc, "patch_size", wv), _req(vc, "width", wv)
    out_dim, n_q = vc.get("output_dim", 512), vc.get("n_queries", 256)
    if out_dim != D:
        raise EdgemmError(f"{wv}: output_dim {out_dim} != the LM's hidden_size {D}")
    heads, layers = _req(vc, "heads", wv), _req(vc, "layers", wv)
    seq = hf.get("seq_length", 2048)
    window, k, ranks = 0, 0, []
    if monkey:                      # Monkey's encode: 448 px windows (sliding_window, stride 448) + the global view
        window, k = MONKEY_WINDOW, vc.get("lora_repeat_num", 4)
        if size % window or (size // window) ** 2 != k:
            raise EdgemmError(f"{wv}: image_size {size} gives {(size // window) ** 2} windows of {window} px, but "
                              f"lora_repeat_num is {k} (one LoRA per window)")
        b0 = "transformer.visual.transformer.resblocks.0."
        lora = [b0 + "attn.in_proj_lora.0.lora_a.weight", b0 + "mlp_lora.0.lora_a.weight"]
        if any(n not in src.shapes for n in lora):
            raise EdgemmError(f"the checkpoint lacks Monkey's window LoRA ({lora[0]})")
        ranks = [int(src.shapes[n][0]) for n in lora]
    cfg = ModelConfig(
        name=src.path.name,
        vision=VisionConfig(image_size=size, patch_size=patch, width=width, layers=layers, heads=heads,
                            mlp_dim=int(width * _req(vc, "mlp_ratio", wv)), eps=1e-6, gelu="erf",
                            image_mean=CLIP_MEAN, image_std=CLIP_STD, arch="qwen", window=window,
                            window_lora=ranks),
        adapter=AdapterConfig(kind="resampler", eps=1e-6, query_tokens=n_q, resampler_heads=out_dim // 128),
        decoder=DecoderConfig(vocab_size=_req(hf, "vocab_size", w), d_model=D, n_layers=_req(hf, "num_hidden_layers", w),
                              n_heads=H, ffn_dim=_req(hf, "intermediate_size", w) // 2,
                              rope_theta=float(hf.get("rotary_emb_base", 10000)),
                              rms_eps=hf.get("layer_norm_epsilon", 1e-6), max_seq_len=seq,
                              tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=True,
                              single_branch=True))
    plan = Plan(cfg)
    P = cfg.vision.n_patches
    t, v = "transformer.", "transformer.visual."
    plan.add("decoder.tok_embeddings.weight", t + "wte.weight")
    plan.add("decoder.norm.weight", t + "ln_f.weight")
    if cfg.decoder.tie_embeddings:
        plan.ignore("lm_head.weight", "tied to the token embedding")
    else:
        plan.add("decoder.lm_head.weight", "lm_head.weight")
    for i in range(cfg.decoder.n_layers):
        e, s = f"decoder.layers.{i}.", f"{t}h.{i}."
        for ours, theirs in (("attn_norm.weight", "ln_1.weight"), ("ffn_norm.weight", "ln_2.weight"),
                             ("text.qkv.weight", "attn.c_attn.weight"), ("text.qkv.bias", "attn.c_attn.bias"),
                             ("text.o.weight", "attn.c_proj.weight"), ("text.gate.weight", "mlp.w2.weight"),
                             ("text.up.weight", "mlp.w1.weight"), ("text.down.weight", "mlp.c_proj.weight")):
            plan.add(e + ours, s + theirs)
    # the ViT
    plan.add("vision.patch_embed.weight", v + "conv1.weight")
    plan.add("vision.pos", v + "positional_embedding", fn=lambda ts: _table(ts, P, True))
    for n in ("weight", "bias"):
        plan.add(f"vision.pre_norm.{n}", v + f"ln_pre.{n}")
        for i in range(layers):
            e, s = f"vision.blocks.{i}.", f"{v}transformer.resblocks.{i}."
            plan.add(e + f"qkv.{n}", s + f"attn.in_proj.{n}", fn=lambda ts: _in_proj(ts, heads))
            for ours, theirs in (("proj", "attn.out_proj"), ("ln1", "ln_1"), ("ln2", "ln_2"), ("fc1", "mlp.c_fc"),
                                 ("fc2", "mlp.c_proj")):
                plan.add(e + f"{ours}.{n}", s + f"{theirs}.{n}")
    for i in range(layers if k else 0):                     # Monkey: each window's LoRA, stacked, scale folded in
        e, s = f"vision.blocks.{i}.", f"{v}transformer.resblocks.{i}."
        for ours, theirs, fix in (("lora_qkv", "attn.in_proj_lora", heads), ("lora_proj", "attn.out_proj_lora", 0),
                                  ("lora_mlp", "mlp_lora", 0)):
            lo = [f"{s}{theirs}.{j}." for j in range(k)]
            plan.add(e + f"{ours}.a", *[x + "lora_a.weight" for x in lo], fn=_stack)
            plan.add(e + f"{ours}.b", *[x + y for x in lo for y in ("lora_b.weight", "lora_scale")],
                     fn=lambda ts, h=fix: _stack([(_in_proj([b], h) if h else b) * sc for b, sc in zip(ts[::2], ts[1::2])]))
    # the resampler, ln_post and proj
    a = v + "attn_pool."
    plan.add("adapter.query", a + "query")
    plan.add("adapter.pos_embed", a + "pos_embed")
    plan.add("adapter.key_pos", a + "pos_embed", fn=lambda ts: _table(ts, P, False))
    if width != D:
        plan.add("adapter.kv_proj.weight", a + "kv_proj.weight")
    plan.add("adapter.attn.in_proj_weight", a + "attn.in_proj_weight")
    plan.add("adapter.attn.in_proj_bias", a + "attn.in_proj_bias")
    plan.add("adapter.proj.weight", v + "proj", fn=lambda ts: ts[0].t().contiguous())
    for n in ("weight", "bias"):
        plan.add(f"adapter.attn.out_proj.{n}", a + f"attn.out_proj.{n}")
        for ln in ("ln_q", "ln_kv"):
            plan.add(f"adapter.{ln}.{n}", a + f"{ln}.{n}")
        plan.add(f"adapter.ln_post.{n}", v + f"ln_post.{n}")
    img = vc.get("image_start_id")
    plan.notes.append(f"an image is <img> ({img}), its {cfg.n_image_rows} resampled rows, </img>: the chat template "
                      "renders " + ("'<img><image></img> question Answer: '" if monkey else "'Picture N: <img><image></img>'"))
    if hf.get("use_dynamic_ntk") or hf.get("use_logn_attn"):
        plan.notes.append(f"dynamic NTK RoPE / log-n attention are not computed: they change nothing up to "
                          f"seq_length {seq} tokens, the context the import keeps")
    return plan


@register
class QwenVL(Family):
    name = "qwen_vl"
    model_types = ("qwen",)
    architectures = ("qwenlmheadmodel",)
    source = "Qwen/Qwen-VL release (`QWenLMHeadModel`, visual.py)"
    computes = "ViT + one cross-attention resampler: 256 rows per image between `<img>` and `</img>`"
    blocks = ("vision:qwen", "connector:resampler", "layer:single")
    core = ("single branch (llava)", "qkv bias", "qwen-vl vision tower", "cross-attention resampler (qwen-vl)")

    def detect(self, hf):                   # Qwen (text only) has the same model_type and no visual config
        return super().detect(hf) and isinstance(hf.get("visual"), dict)

    def plan(self, hf, src, rules="original"):
        return map_qwen_vl(hf, src, rules)


@register
class Monkey(QwenVL):
    name = "monkey"
    model_types = ("monkey",)
    architectures = ("monkeylmheadmodel",)
    source = "Yuliang-Liu/Monkey release (`MonkeyLMHeadModel`)"
    computes = "Qwen-VL's resampler over 448 px windows (a LoRA each) + the global view: 1280 rows per image"
    core = QwenVL.core + ("per-window LoRA (monkey)",)

    def detect(self, hf):
        return Family.detect(self, hf) and isinstance(hf.get("visual"), dict)

    def plan(self, hf, src, rules="original"):
        return map_qwen_vl(hf, src, rules, monkey=True)


# --------------------------------------------------------------------------- the tokenizer: qwen.tiktoken -> tokenizer.json
def read_ranks(path: Path) -> dict[bytes, int]:
    """qwen.tiktoken: one `base64(token bytes) rank` a line (tokenization_qwen._load_tiktoken_bpe)."""
    ranks = {}
    for n, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok, validate=True)] = int(rank)
        except ValueError:
            raise EdgemmError(f"{path}:{n}: not a 'base64 rank' line of a tiktoken file") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise EdgemmError(f"{path}: the ranks are not 0..{len(ranks) - 1} once each")
    return ranks


def tokenizer_from_ranks(ranks: dict[bytes, int]):
    """A tokenizers byte-level BPE that encodes as tiktoken does with these ranks. tiktoken merges the adjacent pair
    whose concatenation has the lowest rank first: as BPE, every split of a token into two tokens is a merge whose
    priority is the rank it makes. (tiktoken also takes a split piece that is a token whole; a BPE vocabulary's merges
    rebuild such a piece, and Qwen2's tokenizer.json, the same ranks, does not ignore merges either, which llama.cpp's
    qwen2 pre-tokenizer needs.) Qwen's split pattern, no prefix space, NFC (tokenization_qwen normalises); the
    special tokens after the ranks, in tokenization_qwen's order."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    table = _byte_chars()

    def s(b: bytes) -> str:
        return "".join(table[x] for x in b)
    merges = sorted((r, ranks[tok[:i]], ranks[tok[i:]], i, tok) for tok, r in ranks.items()
                    for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks)
    bpe = models.BPE({s(t): r for t, r in ranks.items()}, [(s(t[:i]), s(t[i:])) for *_, i, t in merges],
                     fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    if tok.token_to_id(SPECIALS[0]) != len(ranks):
        raise EdgemmError("the tiktoken ranks leave gaps: the special tokens would not follow them")
    return tok


def _byte_chars() -> dict[int, str]:
    """GPT-2's bytes_to_unicode (what tokenizers' ByteLevel maps bytes to): printable bytes to themselves, the
    others to chr(256 + k) in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + k) for k, b in enumerate(rest)}}


def convert_tokenizer(src, out) -> Path:
    """SRC/qwen.tiktoken -> OUT/tokenizer.json, tokenizer_config.json (eos <|im_end|>, pad <|endoftext|>, the chat
    template; Monkey, by SRC/config.json's model_type: its demo's prompt, eos <|endoftext|>), for
    `edgemm import SRC --tokenizer OUT`."""
    src, out = Path(src), Path(out)
    try:
        monkey = json.loads((src / "config.json").read_text()).get("model_type") == "monkey"
    except (OSError, ValueError, AttributeError):
        monkey = False
    f = src / "qwen.tiktoken"
    if not f.is_file():
        raise EdgemmError(f"{src} has no qwen.tiktoken (Qwen-VL's tokenizer ranks)")
    tok = tokenizer_from_ranks(read_ranks(f))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|endoftext|>" if monkey else "<|im_end|>", "pad_token": "<|endoftext|>",
        "add_bos_token": False, "chat_template": MONKEY_TEMPLATE if monkey else TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
    return out


if __name__ == "__main__":
    import sys
    if len(sys.argv) != 3:
        print("usage: python -m edgemm.families.qwen_vl SRC OUT   (SRC/qwen.tiktoken -> OUT/tokenizer.json)",
              file=sys.stderr)
        sys.exit(2)
    try:
        print(convert_tokenizer(sys.argv[1], sys.argv[2]))
    except EdgemmError as e:                # a user's mistake: one line, exit 2 (as the CLI)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
