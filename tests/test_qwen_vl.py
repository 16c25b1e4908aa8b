"""Qwen-VL (the Qwen/Qwen-VL release: QWenLMHeadModel with visual.py, tiktoken tokenizer): no transformers class
exists (remote code), so the reference is a re-computation written here from the released code's equations, under its
parameter names (visual.py's VisionTransformer / Resampler with torch.nn.MultiheadAttention, modeling_qwen.py's QWen
blocks): its state dict is the tiny checkpoint the import reads (config.json `model_type: qwen`, `visual`)."""
import base64
import json
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgemm import families

families.families()         # registered in _MODULES order (the README table's) before a family module is imported here
from edgemm.families.qwen_vl import PAT_STR, SPECIALS  # noqa: E402

VIS = dict(image_size=28, patch_size=7, width=48, layers=2, heads=4, mlp_ratio=2.5, output_dim=256,
           image_start_id=0)                    # (image_start_id set from the tokenizer below)
D, LAYERS, HEADS, FFN2 = 256, 2, 4, 192          # output_dim = hidden_size; resampler heads output_dim // 128 = 2
# Monkey: 896 px images, its 448 px windows (hard-coded in its encode); 28 px patches keep the tiny tower at 16 x 16
MONKEY_VIS = dict(VIS, image_size=896, patch_size=28, lora_repeat_num=4)
QUESTION = "what color is the circle?"


# ------------------------------------------------------------------ visual.py's equations
def get_2d_sincos_pos_embed(dim, grid):
    """visual.py (MAE's): meshgrid(w, h), the first half from grid[0], each half [sin | cos]."""
    g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)), 0)

    def one(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float32) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], 1)
    return np.concatenate([one(dim // 2, g[0]), one(dim // 2, g[1])], 1)


def get_abs_pos(abs_pos, tgt_size):
    src, tgt = int(math.sqrt(abs_pos.size(0))), int(math.sqrt(tgt_size))
    if src == tgt:
        return abs_pos
    return F.interpolate(abs_pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2), size=(tgt, tgt),
                         mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2)


class Resampler(nn.Module):
    def __init__(self, grid, dim, heads, kv_dim):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.from_numpy(get_2d_sincos_pos_embed(dim, grid)).float())
        self.query = nn.Parameter(torch.zeros(grid * grid, dim))
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False) if kv_dim != dim else nn.Identity()
        self.attn = nn.MultiheadAttention(dim, heads)
        self.ln_q, self.ln_kv = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):                                   # [B, L, kv_dim] -> [B, Q, dim]
        pos = get_abs_pos(self.pos_embed, x.size(1))
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)
        N = x.shape[1]
        q = self.ln_q(self.query)
        out = self.attn(q.unsqueeze(1).repeat(1, N, 1) + self.pos_embed.unsqueeze(1), x + pos.unsqueeze(1), x)[0]
        return out.permute(1, 0, 2)


class Lora_Adapter(nn.Module):
    """Monkey's visual.py: lora_b(lora_a(x)) * lora_scale (dropout off at inference)."""

    def __init__(self, d, out, r):
        super().__init__()
        self.lora_scale = nn.Parameter(torch.ones(1))
        self.lora_a, self.lora_b = nn.Linear(d, r, bias=False), nn.Linear(r, out, bias=False)

    def forward(self, x):
        return self.lora_b(self.lora_a(x)) * self.lora_scale


class VisualAttention(nn.Module):
    """Megatron's layout: in_proj's output viewed [.., heads, 3 * head_dim] and split into q, k, v per head; Monkey:
    + the window's LoRA on in_proj and out_proj."""

    def __init__(self, dim, heads, lora=0):
        super().__init__()
        self.h, self.e = heads, dim // heads
        self.in_proj, self.out_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        if lora:
            self.in_proj_lora = nn.ModuleList(Lora_Adapter(dim, 3 * dim, 16) for _ in range(lora))
            self.out_proj_lora = nn.ModuleList(Lora_Adapter(dim, dim, 16) for _ in range(lora))

    def forward(self, x, idx=None):                         # [L, B, dim]
        L, B, _ = x.shape
        mixed = self.in_proj(x) + (0 if idx is None else self.in_proj_lora[idx](x))
        q, k, v = mixed.view(L, B, self.h, 3 * self.e).split(self.e, dim=-1)
        q, k, v = (t.reshape(L, B * self.h, self.e).transpose(0, 1) for t in (q, k, v))
        p = torch.bmm(q / math.sqrt(self.e), k.transpose(-2, -1)).softmax(-1)
        c = torch.bmm(p, v).view(B, self.h, L, self.e).permute(2, 0, 1, 3).reshape(L, B, -1)
        return self.out_proj(c) + (0 if idx is None else self.out_proj_lora[idx](c))


class ResBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio, lora=0):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = VisualAttention(dim, heads, lora)
        w = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(dim, w)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(w, dim))]))
        if lora:
            self.mlp_lora = nn.ModuleList(Lora_Adapter(dim, dim, 32) for _ in range(lora))

    def forward(self, x, idx=None):
        x = x + self.attn(self.ln_1(x), idx)
        return x + self.mlp(self.ln_2(x)) + (0 if idx is None else self.mlp_lora[idx](x))


class Blocks(nn.Module):
    def __init__(self, dim, layers, heads, mlp_ratio, lora=0):
        super().__init__()
        self.resblocks = nn.ModuleList(ResBlock(dim, heads, mlp_ratio, lora) for _ in range(layers))


class VisionTransformer(nn.Module):
    def __init__(self, image_size, patch_size, width, layers, heads, mlp_ratio, n_queries=256, output_dim=512,
                 lora_repeat_num=0, **kw):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch_size, patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.randn(256, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width, eps=1e-6)
        self.transformer = Blocks(width, layers, heads, mlp_ratio, lora_repeat_num)
        self.lora = lora_repeat_num
        self.attn_pool = Resampler(int(math.sqrt(n_queries)), output_dim, output_dim // 128, width)
        self.ln_post = nn.LayerNorm(output_dim, eps=1e-6)
        self.proj = nn.Parameter(torch.randn(output_dim, output_dim) * output_dim ** -0.5)

    def tower(self, x, idx=None):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        x = self.ln_pre(x + get_abs_pos(self.positional_embedding, x.size(1))).permute(1, 0, 2)
        for r in self.transformer.resblocks:
            x = r(x, idx)
        return x.permute(1, 0, 2)

    def one(self, x, idx=None):
        return self.ln_post(self.attn_pool(self.tower(x, idx))) @ self.proj

    def forward(self, x):
        """Qwen-VL: the image; Monkey (MonkeyModel.forward): its 448 px windows row-major, each with its LoRA, then
        the image interpolated bicubically to 448 without LoRA, their rows concatenated."""
        if not self.lora:
            return self.one(x)
        n = x.shape[-1] // 448
        wins = [self.one(x[:, :, i * 448:(i + 1) * 448, j * 448:(j + 1) * 448], i * n + j)
                for i in range(n) for j in range(n)]
        return torch.cat(wins + [self.one(F.interpolate(x, size=(448, 448), mode="bicubic"))], 1)


# ------------------------------------------------------------------ modeling_qwen.py's equations
class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class QWenAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn, self.c_proj = nn.Linear(D, 3 * D), nn.Linear(D, D, bias=False)

    def forward(self, x, cos, sin):                         # x [B, T, D]
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, HEADS, D // HEADS) for t in self.c_attn(x).split(D, dim=2))

        def rot(t):                                         # apply_rotary_pos_emb with _rotate_half
            t1, t2 = t.chunk(2, -1)
            return t * cos + torch.cat((-t2, t1), -1) * sin
        q, k, v = rot(q).transpose(1, 2), rot(k).transpose(1, 2), v.transpose(1, 2)
        w = q @ k.transpose(-1, -2) / (D // HEADS) ** 0.5
        w = w + torch.full((T, T), torch.finfo(w.dtype).min).triu(1)
        return self.c_proj((w.softmax(-1) @ v).transpose(1, 2).reshape(B, T, D))


class QWenMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Linear(D, FFN2, bias=False), nn.Linear(D, FFN2, bias=False)
        self.c_proj = nn.Linear(FFN2, D, bias=False)

    def forward(self, x):
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class QWenBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.attn, self.ln_2, self.mlp = RMSNorm(D), QWenAttention(), RMSNorm(D), QWenMLP()

    def forward(self, x, cos, sin):
        x = x + self.attn(self.ln_1(x), cos, sin)
        return x + self.mlp(self.ln_2(x))


class QWenModel(nn.Module):
    def __init__(self, vocab, visual):
        super().__init__()
        self.wte = nn.Embedding(vocab, D)
        self.h = nn.ModuleList(QWenBlock() for _ in range(LAYERS))
        self.ln_f = RMSNorm(D)
        self.visual = VisionTransformer(**visual)


class QWenLMHeadModel(nn.Module):
    def __init__(self, vocab, visual):
        super().__init__()
        self.transformer = QWenModel(vocab, visual)
        self.lm_head = nn.Linear(D, vocab, bias=False)
        self.start = visual["image_start_id"]

    def forward(self, ids, pixels):                         # QWenModel.forward: rows a+1 .. b-1 are the image's
        x = self.transformer.wte(ids).clone()
        a, b = int((ids[0] == self.start).nonzero()[0]), int((ids[0] == self.start + 1).nonzero()[0])
        x[0, a + 1: b] = self.transformer.visual(pixels)[0]
        E, T = D // HEADS, ids.shape[1]
        inv = 1.0 / (10000 ** (torch.arange(0, E, 2).float() / E))
        emb = torch.cat([torch.outer(torch.arange(T).float(), inv)] * 2, -1)[None, :, None, :]
        for blk in self.transformer.h:
            x = blk(x, emb.cos(), emb.sin())
        return self.lm_head(self.transformer.ln_f(x))


def _randomize(model, seed):
    """Every parameter away from its init (norm gains and biases, the queries; pos_embed stays the sin-cos table)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if not n.endswith("attn_pool.pos_embed"):
                p.copy_(p + torch.randn(p.shape, generator=g) * (0.3 if p.ndim == 1 else 0.05))
    return model


# ------------------------------------------------------------------ a tiktoken file and tiktoken's algorithm
def _ranks():
    """A tiny qwen.tiktoken: the ranks of a byte-level BPE trained here (a token's rank = its id)."""
    from edgemm.families.qwen_vl import _byte_chars
    from .test_tokenizers import QWEN2_SPLIT, _byte_level
    tok = _byte_level(QWEN2_SPLIT, [], 300, True, False, None)
    back = {c: b for b, c in _byte_chars().items()}
    ranks = {bytes(back[c] for c in t): i for t, i in tok.get_vocab().items()}
    assert sorted(ranks.values()) == list(range(len(ranks)))
    return ranks


def tiktoken_encode(ranks, text):
    """tiktoken's encode (ordinary text; special tokens split off first): the split pattern, a piece in the ranks as
    one token, else the adjacent pair whose concatenation ranks lowest merged until none is in the ranks."""
    import regex
    specials = {t: len(ranks) + i for i, t in enumerate(SPECIALS)}
    out = []
    for part in regex.split("(" + "|".join(regex.escape(s) for s in specials) + ")", text):
        if part in specials:
            out.append(specials[part])
            continue
        for piece in regex.findall(PAT_STR, part):
            parts = [bytes([b]) for b in piece.encode()]
            while len(parts) > 1:
                r, i = min((ranks.get(parts[i] + parts[i + 1], math.inf), i) for i in range(len(parts) - 1))
                if r == math.inf:
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            out += [ranks[p] for p in parts]
    return out


def test_converted_tokenizer_encodes_as_tiktoken(tmp_path):
    """qwen.tiktoken -> tokenizer.json (convert_tokenizer): the ids of texts (words, digits, spaces, newlines,
    punctuation, non-ASCII, Qwen's special tokens) equal tiktoken's algorithm run here on the ranks; decoding
    round-trips; the special tokens follow the ranks in tokenization_qwen's order."""
    from tokenizers import Tokenizer
    from edgemm.families.qwen_vl import convert_tokenizer
    ranks = _ranks()
    (tmp_path / "qwen.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n"
                                                    for t, r in ranks.items()))
    out = convert_tokenizer(tmp_path, tmp_path / "tok")
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    n = len(ranks)
    assert [tok.token_to_id(s) for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>",
                                         "<imgpad>")] == [n, n + 1, n + 2, n + 214, n + 215, n + 216]
    for text in ["what color is the circle?", "<|im_start|>user\nPicture 1: <img></img>\nhi<|im_end|>\n",
                 "  two  spaces\n\n\tand 12345 digits!!", "café naïve — 東京", "I'm here, they'll go; it's", ""]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == tiktoken_encode(ranks, text), text
        assert tok.decode(ids, skip_special_tokens=False) == text
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "qwen.tiktoken").write_text("not base64!! 0\n")
    from edgemm.errors import EdgemmError
    with pytest.raises(EdgemmError, match="not a 'base64 rank' line"):
        convert_tokenizer(bad, tmp_path / "tok2")


# ------------------------------------------------------------------ the blocks against the release's equations
def test_sincos_table_is_the_release():
    from edgemm.blocks.resampler import sincos_2d
    for dim, grid in ((256, 16), (64, 3)):
        assert np.abs(sincos_2d(dim, grid).numpy() - get_2d_sincos_pos_embed(dim, grid)).max() <= 1e-6


@pytest.mark.parametrize("grid, kv_dim", [(4, 48), (16, 48), (6, 256)], ids=["keys-upsampled", "same-grid", "no-kv-proj"])
def test_resampler_matches_release(grid, kv_dim):
    """connector:resampler (+ ln_post, proj) against visual.py's Resampler with torch.nn.MultiheadAttention, random
    queries, LayerNorms and projections, for tower grids smaller than, equal to and other than the 16 x 16 queries
    (the keys' positions interpolated bicubically, as get_abs_pos does), and with kv_proj an identity."""
    from edgemm.blocks.resampler import QwenResampler, abs_pos
    from edgemm.config import AdapterConfig
    torch.manual_seed(0)
    ref = _randomize(Resampler(16, D, D // 128, kv_dim), 1).eval()
    ln_post, proj = nn.LayerNorm(D, eps=1e-6), torch.randn(D, D) * D ** -0.5
    _randomize(ln_post, 2)
    blk = QwenResampler(AdapterConfig(kind="resampler", eps=1e-6, query_tokens=256, resampler_heads=D // 128),
                        kv_dim, grid * grid, D)
    sd = dict(ref.state_dict())
    sd["key_pos"] = abs_pos(ref.pos_embed.detach(), grid * grid)
    sd.update({f"ln_post.{k}": v for k, v in ln_post.state_dict().items()}, **{"proj.weight": proj.t()})
    assert set(sd) == set(blk.state_dict())
    blk.load_state_dict(sd)
    x = torch.randn(2, grid * grid, kv_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ln_post(ref(x)) @ proj
        got = blk(x)
    assert got.shape == (2, 256, D) and (got - want).abs().max().item() <= 1e-4


# ------------------------------------------------------------------ the family: import, logits, export, run
def _release(d, monkey=False):
    """A tiny Qwen-VL (Monkey) in the release's layout: config.json (model_type qwen / monkey, visual),
    model.safetensors under the release's names, qwen.tiktoken; its tokenizer converted; imported."""
    from safetensors.torch import save_file
    from edgemm.families.qwen_vl import convert_tokenizer
    from edgemm.importers import import_checkpoint
    src = d / "hf"
    src.mkdir()
    ranks = _ranks()
    (src / "qwen.tiktoken").write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    vocab = len(ranks) + len(SPECIALS) + 3               # padded past the specials, as the release's 151936
    visual = {**(MONKEY_VIS if monkey else VIS), "image_start_id": len(ranks) + SPECIALS.index("<img>")}
    torch.manual_seed(0)
    ref = _randomize(QWenLMHeadModel(vocab, visual), 5).eval()
    with torch.no_grad():                                # the special tokens' logits 0: greedy answers are text
        ref.lm_head.weight[len(ranks):] = 0
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(src / "model.safetensors"))
    arch, mt = ("MonkeyLMHeadModel", "monkey") if monkey else ("QWenLMHeadModel", "qwen")
    (src / "config.json").write_text(json.dumps({
        "architectures": [arch], "model_type": mt, "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig"},
        "hidden_size": D, "num_attention_heads": HEADS, "num_hidden_layers": LAYERS, "intermediate_size": 2 * FFN2,
        "kv_channels": D // HEADS, "layer_norm_epsilon": 1e-6, "max_position_embeddings": 8192, "no_bias": True,
        "rotary_emb_base": 10000, "rotary_pct": 1.0, "seq_length": 2048, "use_dynamic_ntk": True,
        "use_logn_attn": True, "tie_word_embeddings": False, "vocab_size": vocab, "visual": visual}))
    (src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 8192, "tokenizer_class": "QWenTokenizer",
                                                           "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}))
    (src / "generation_config.json").write_text(json.dumps({"chat_format": "chatml", "eos_token_id": len(ranks),
                                                            "pad_token_id": len(ranks), "max_window_size": 6144}))
    tokdir = convert_tokenizer(src, d / "tok")
    summary = import_checkpoint(src, d / "ck", tokenizer=tokdir, log=None)
    return {"ref": ref, "src": src, "tok": tokdir, "ck": d / "ck", "summary": summary, "n": len(ranks)}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return _release(tmp_path_factory.mktemp("qwen-vl"))


@pytest.fixture(scope="module")
def monkey(tmp_path_factory):
    return _release(tmp_path_factory.mktemp("monkey"), monkey=True)


def test_import_reads_the_layout(released):
    """Detected as qwen_vl (and plain Qwen, without `visual`, is not); the config's blocks and tokens; every source
    tensor imported; the chat template renders the image as Picture 1: <img><image></img>."""
    from edgemm.checkpoint import load_checkpoint
    s, n = released["summary"], released["n"]
    assert s["family"] == "qwen_vl" and not s["not_imported"]
    assert {"qkv bias", "qwen-vl vision tower", "cross-attention resampler (qwen-vl)"} <= set(s["variants"])
    assert families.detect(json.loads((released["src"] / "config.json").read_text())) == "qwen_vl"
    with pytest.raises(Exception, match="cannot tell"):
        families.detect({"model_type": "qwen", "architectures": ["QWenLMHeadModel"]})
    m, tok = load_checkpoint(released["ck"])
    from edgemm.info import checkpoint_param_counts, param_counts
    assert checkpoint_param_counts(released["ck"]) == m.param_counts() == param_counts(m.cfg)
    c = m.cfg
    assert (c.vision.arch, c.adapter.kind, c.n_image_rows, c.adapter.resampler_heads) == ("qwen", "resampler", 256, 2)
    assert (c.decoder.ffn_dim, c.decoder.qkv_bias, c.decoder.max_seq_len) == (FFN2, True, 2048)
    assert c.tokens.eos == [n + 2, n] and c.tokens.bos is None and c.tokens.pad == n
    assert "Picture ' + n.i|string + ': <img><image></img>" in (released["ck"] / "chat_template.jinja").read_text()


def _prompt_ids(released):
    """make_context's ChatML with from_list_format's image: <img> + the path padded with <imgpad> to 256 + </img>."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(released["tok"] / "tokenizer.json"))
    enc = lambda t: tok.encode(t, add_special_tokens=False).ids  # noqa: E731
    pre = enc("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nPicture 1: <img>")
    path = list(b"x.png")
    pad = [tok.token_to_id("<imgpad>")] * (256 - len(path))
    post = enc(f"</img>\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n")
    return pre, path + pad, post


def test_vision_and_logits_match_release(released):
    """The tower (conv1, interpolated positions, ln_pre, Megatron in_proj reordered), the resampler's 256 rows and
    the logits of Qwen-VL-Chat's prompt with an image against the release's equations, within 1e-4."""
    from edgemm.checkpoint import load_checkpoint
    ref = released["ref"]
    m, _ = load_checkpoint(released["ck"])
    px = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(7))
    pre, img, post = _prompt_ids(released)
    ids = torch.tensor([pre + img + post])
    with torch.no_grad():
        assert (m.vision(px) - ref.transformer.visual.tower(px)).abs().max().item() <= 1e-4
        rows = m.encode_image(px)
        assert rows.shape == (1, 256, D)
        assert (rows - ref.transformer.visual(px)).abs().max().item() <= 1e-4
        want = ref(ids, px)[0]
        got = m.forward_full([("text", torch.tensor([pre])), ("image", rows), ("text", torch.tensor([post]))])[0]
    assert got.shape == want.shape and (got - want).abs().max().item() <= 1e-4


def test_edgemm_prompt_is_the_release(released):
    """edgemm's prompt for a chat with one image: the stored template renders make_context's ChatML and
    from_list_format's 'Picture 1: <img>...</img>', the image's 256 rows between <img> and </img>."""
    from edgemm.chat_template import normalize_messages, segments_template
    from edgemm.checkpoint import load_checkpoint
    _, tok = load_checkpoint(released["ck"])
    template = (released["ck"] / "chat_template.jinja").read_text()
    msgs = normalize_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                                            {"type": "text", "text": QUESTION}]}])
    segs = segments_template(tok, template, msgs)
    pre, _, post = _prompt_ids(released)
    assert [k for k, _ in segs] == ["text", "image", "text"] and segs[0][1] == pre and segs[2][1] == post


def test_cli_import_export_onnx_and_run(released, tmp_path):
    """`edgemm import --tokenizer` (the converted tokenizer), `edgemm export --target onnx` (validated against the
    reference by the exporter) and `edgemm run --image` on the bundle answer as the torch reference does."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    from click.testing import CliRunner
    from PIL import Image
    from edgemm.cli import main
    from edgemm.generation import ChatSession, GenerationConfig
    from edgemm.runtimes import load_backend
    run = CliRunner()
    ck = tmp_path / "ck"
    r = run.invoke(main, ["import", str(released["src"]), "--tokenizer", str(released["tok"]), "-o", str(ck)])
    assert r.exit_code == 0, r.output
    r = run.invoke(main, ["info", "--model", str(ck)])
    assert r.exit_code == 0 and "16 tower rows, resampled to 256 queries: 256 image rows" in r.output, r.output
    img = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "img.png")
    out = tmp_path / "onnx"
    r = run.invoke(main, ["export", "--target", "onnx", "--model", str(ck), "-o", str(out)])
    assert r.exit_code == 0, r.output
    r = run.invoke(main, ["run", "--bundle", str(out), "--backend", "ort", "--device", "cpu", "--image",
                          str(tmp_path / "img.png"), "--max-new-tokens", "3", QUESTION])
    assert r.exit_code == 0, r.output
    ref = ChatSession(load_backend("torch", model=str(ck), device="cpu"), GenerationConfig(max_new_tokens=3))
    ort = ChatSession(load_backend("ort", bundle=str(out), device="cpu"), GenerationConfig(max_new_tokens=3))
    for s in (ref, ort):
        assert "<img><image></img>" in s.template
        s.set_image(tmp_path / "img.png")
    want = ref.ask(QUESTION)
    assert want.strip() and ort.ask(QUESTION) == want and want.strip() in r.output


def test_trt_qdq_graphs_validate(released, tmp_path):
    """`--target trt` (int8 Q/DQ graphs in standard ops, engines not built here): the exporter's checks of every
    stage (the traced vision stage with the resampler among them) against the reference pass."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    from edgemm.export.trt import export_trt
    man = export_trt(str(released["ck"]), tmp_path / "trt", precision="int8", no_build=True, log=None)
    assert all(s["ok"] for s in man["validation"]["stages"].values())
    assert man["model"]["vision"]["arch"] == "qwen" and man["model"]["adapter"]["kind"] == "resampler"


def test_monkey_rows_and_logits_match_release(monkey):
    """Monkey: the four 448 px windows each through the tower with its own LoRA (in_proj, out_proj, beside the MLP;
    merged scale, Megatron rows reordered), the global view resized bicubically in the stage, 1280 resampled rows and
    the logits of its demo prompt (<img>...</img> question Answer: ) against the release's equations, within 1e-4."""
    from tokenizers import Tokenizer
    from edgemm.checkpoint import load_checkpoint
    ref, s = monkey["ref"], monkey["summary"]
    assert s["family"] == "monkey" and not s["not_imported"] and "per-window LoRA (monkey)" in s["variants"]
    m, _ = load_checkpoint(monkey["ck"])
    from edgemm.info import checkpoint_param_counts, param_counts
    assert checkpoint_param_counts(monkey["ck"]) == m.param_counts() == param_counts(m.cfg)
    assert (m.cfg.vision.window, m.cfg.vision.window_lora, m.cfg.n_image_rows) == (448, [16, 32], 1280)
    assert m.cfg.tokens.eos[0] == monkey["n"]                          # <|endoftext|>: the demo's eos
    px = torch.randn(1, 3, 896, 896, generator=torch.Generator().manual_seed(7))
    tok = Tokenizer.from_file(str(monkey["tok"] / "tokenizer.json"))
    pre = tok.encode("<img>", add_special_tokens=False).ids
    post = tok.encode(f"</img> {QUESTION} Answer: ", add_special_tokens=False).ids
    img = list(b"x.png") + [tok.token_to_id("<imgpad>")] * (1280 - 5)
    with torch.no_grad():
        rows = m.encode_image(px)
        want_rows = ref.transformer.visual(px)
        assert rows.shape == want_rows.shape == (1, 1280, D)
        assert (rows - want_rows).abs().max().item() <= 1e-4
        no_lora = ref.transformer.visual.one(px[:, :, :448, :448])            # the LoRA changes the window's rows
        assert (no_lora - want_rows[:, :256]).abs().max().item() > 1e-2
        want = ref(torch.tensor([pre + img + post]), px)[0]
        got = m.forward_full([("text", torch.tensor([pre])), ("image", rows), ("text", torch.tensor([post]))])[0]
    assert (got - want).abs().max().item() <= 1e-4
    from edgemm.chat_template import normalize_messages, segments_template
    _, etok = load_checkpoint(monkey["ck"])
    msgs = normalize_messages([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                                            {"type": "text", "text": QUESTION}]}])
    segs = segments_template(etok, (monkey["ck"] / "chat_template.jinja").read_text(), msgs)
    assert [k for k, _ in segs] == ["text", "image", "text"] and segs[0][1] == pre and segs[2][1] == post


def test_monkey_onnx_export_and_run(monkey, tmp_path):
    """Monkey's bundle: the traced vision stage (windows, their LoRA, the bicubic global view, the resampler per tile)
    validated against the reference by the onnx exporter; `edgemm run --image` answers as the torch backend."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    from click.testing import CliRunner
    from PIL import Image
    from edgemm.cli import main
    from edgemm.generation import ChatSession, GenerationConfig
    from edgemm.runtimes import load_backend
    run = CliRunner()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    r = run.invoke(main, ["info", "--model", str(monkey["ck"])])
    assert "5 tiles (4 448px windows + the whole image) x 256 tower rows" in r.output, r.output
    out = tmp_path / "onnx"
    r = run.invoke(main, ["export", "--target", "onnx", "--model", str(monkey["ck"]), "-o", str(out)])
    assert r.exit_code == 0, r.output
    answers = []
    for b in (load_backend("torch", model=str(monkey["ck"]), device="cpu"),
              load_backend("ort", bundle=str(out), device="cpu")):
        s = ChatSession(b, GenerationConfig(max_new_tokens=3))
        s.set_image(tmp_path / "i.png")
        answers.append(s.ask(QUESTION))
    assert answers[0].strip() and answers[1] == answers[0]


def test_monkey_trt_qdq_graphs_validate(monkey, tmp_path):
    """Monkey's `--target trt` int8 Q/DQ graphs (engines not built here): every stage passes the exporter's checks,
    the vision stage with its windows, LoRA and bicubic global view among them."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    from edgemm.export.trt import export_trt
    man = export_trt(str(monkey["ck"]), tmp_path / "trt", precision="int8", no_build=True, log=None)
    assert all(s["ok"] for s in man["validation"]["stages"].values())


@pytest.mark.parametrize("name", ["released", "monkey"])
def test_gguf_decoder_beside_onnx_vision(name, request, tmp_path):
    """`--target gguf`: llama.cpp's MiniCPM-V resampler is not Qwen-VL's (no query positions; key positions at grid
    points), so the vision stage (tower, resampler; Monkey's windows) is the traced ONNX graph beside the decoder GGUF
    (llama.cpp's qwen2: QKV bias, NEOX RoPE) and the converted tokenizer; the export's checks in stock llama.cpp pass
    and edgemm's llamacpp backend answers as the torch reference does (greedy)."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install edgemm[gguf])")
    from edgemm.export.gguf import export_gguf
    from edgemm.generation import ChatSession, GenerationConfig
    from edgemm.runtimes import load_backend
    r = request.getfixturevalue(name)
    man = export_gguf(model=str(r["ck"]), out=tmp_path / "b", precision="f32", log=None, threads=2)
    st, v = man["stages"], man["validation"]
    assert st["vision"]["format"] == "onnx" and st["decoder"]["format"] == "gguf (arch qwen2)"
    assert v["passed"] and v["vision_rows_max_abs"] < 1e-4 and v["image_max_abs"] < 1e-3
    img = np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    answers = []
    for b in (load_backend("torch", model=str(r["ck"]), device="cpu"),
              load_backend("llamacpp", bundle=str(tmp_path / "b"), threads=2)):
        s = ChatSession(b, GenerationConfig(max_new_tokens=3))
        s.set_image(img)
        answers.append(s.ask(QUESTION))
    assert answers[0].strip() and answers[1] == answers[0]
