"""Reference model: KV cache == full recompute, routing is real, variants."""
import copy

import numpy as np
import pytest
import torch

from edgemm.config import get_preset
from edgemm.errors import UnsupportedVariant
from edgemm.model import EdgeMM, KVCache


def _model(**decoder_overrides):
    cfg = get_preset("tiny-shapes")
    for k, v in decoder_overrides.items():
        setattr(cfg.decoder, k, v)
    torch.manual_seed(0)
    m = EdgeMM(cfg.validate()).init_weights(3).eval()
    # make every branch weight clearly different from init symmetry
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def _prompt(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(1, 3, 48, 48, generator=g)
    return (torch.randint(0, 500, (1, 4), generator=g), m.encode_image(pixels),
            torch.randint(0, 500, (1, 9), generator=g))


@pytest.mark.parametrize("variant", [{}, {"n_kv_heads": 2}, {"qkv_bias": True},
                                     {"position_rule": "cogvlm", "eoi_branch": "text"},
                                     {"vision_down_ratio": 4, "per_modality_norms": True, "cross_modal_bridge": 4},
                                     {"vision_rank": 8, "per_modality_norms": True, "n_kv_heads": 2},
                                     {"single_branch": True, "n_kv_heads": 2}])
def test_kv_cache_decode_matches_full_recompute(variant):
    m = _model(**variant)
    pre, img, post = _prompt(m)
    decode = torch.randint(0, 500, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = KVCache.empty(m.cfg.decoder)
        _, pos = m.forward_segment("text", pre, cache, 0)
        _, pos = m.forward_segment("image", img, cache, pos)
        step_logits = [m.forward_segment("text", post, cache, pos)[0][0, -1]]
        pos += post.shape[1]
        for t in range(decode.shape[1]):
            lg, pos = m.forward_segment("text", decode[:, t:t + 1], cache, pos)
            step_logits.append(lg[0, -1])
        full = m.forward_full([("text", pre), ("image", img), ("text", torch.cat([post, decode], 1))])[0]
    n = decode.shape[1]
    for i, lg in enumerate(step_logits):
        ref = full[-(n + 1) + i]
        assert (lg - ref).abs().max().item() <= 1e-5


def test_routing_vision_weights_do_not_touch_text_prompts():
    m = _model()
    pre, img, post = _prompt(m)
    text_only = torch.cat([pre, post], 1)
    with torch.no_grad():
        base_text = m.forward_full([("text", text_only)])
        base_img = m.forward_full([("text", pre), ("image", img), ("text", post)])
        m2 = copy.deepcopy(m)
        for layer in m2.decoder.layers:
            for p in layer.vision.parameters():
                p.add_(torch.randn_like(p))
        assert torch.equal(m2.forward_full([("text", text_only)]), base_text)
        assert (m2.forward_full([("text", pre), ("image", img), ("text", post)]) - base_img).abs().max() > 1e-3
        m3 = copy.deepcopy(m)
        for layer in m3.decoder.layers:
            for p in layer.text.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        assert (m3.forward_full([("text", text_only)]) - base_text).abs().max() > 1e-3
        assert (m3.forward_full([("text", pre), ("image", img), ("text", post)]) - base_img).abs().max() > 1e-3


def test_decoding_reads_no_vision_weight():
    """A text segment through forward_segment never touches a vision-branch module."""
    m = _model()
    touched = []
    for layer in m.decoder.layers:
        for mod in layer.vision.modules():
            mod.register_forward_hook(lambda *a: touched.append(1))
    with torch.no_grad():
        m.forward_segment("text", torch.tensor([[1, 2, 3]]), KVCache.empty(m.cfg.decoder), 0)
    assert touched == []
    with torch.no_grad():
        m.forward_segment("image", _prompt(m)[1], KVCache.empty(m.cfg.decoder), 0)
    assert touched


def test_vit_appends_cls_and_drops_it():
    m = _model()
    px = torch.randn(2, 3, 48, 48)
    feats = m.vision(px)
    assert feats.shape == (2, m.cfg.vision.n_patches, m.cfg.vision.width)
    assert m.encode_image(px).shape == (2, m.cfg.n_image_rows, m.cfg.decoder.d_model)


def test_cogvlm_position_rule_collapses_patch_positions():
    m = _model(position_rule="cogvlm")
    pos = m.image_positions(5)
    assert pos[0] == 5 and pos[-1] == 7 and bool((pos[1:-1] == 6).all())
    assert m.next_position(pos) == 8


def _owl2(seed=0):
    cfg = get_preset("tiny-shapes")
    cfg.decoder.n_layers, cfg.decoder.n_kv_heads = 2, 2
    cfg.decoder.per_modality_kv = cfg.decoder.per_modality_norms = True
    m = EdgeMM(cfg.validate()).init_weights(seed)
    with torch.no_grad():                     # norms away from one, so that per-modality norms matter
        g = torch.Generator().manual_seed(seed + 7)
        for n, p in m.decoder.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return m


def test_mplug_owl2_modality_adaptive_module_matches_the_paper_equations():
    """mPLUG-Owl2's layer, recomputed here from the paper's equations: per-modality input and post-attention
    norms and K/V projections, a shared Q, attention output and MLP; causal attention over all rows."""
    import torch.nn.functional as F
    from edgemm.model import apply_rope, rope_cos_sin
    m = _owl2()
    c = m.cfg.decoder
    H, K, E, D = c.n_heads, c.kv_heads, c.head_dim, c.d_model
    lay0 = m.decoder.layers[0]
    assert set(n for n, _ in lay0.vision.named_parameters()) == {"k.weight", "v.weight"}    # only K/V are its own
    g = torch.Generator().manual_seed(3)
    pre, post = torch.randint(4, 500, (1, 4), generator=g), torch.randint(4, 500, (1, 5), generator=g)
    img = torch.randn(1, m.cfg.n_image_rows, D, generator=g) * 0.5
    with torch.no_grad():
        got = m.forward_full([("text", pre), ("image", img), ("text", post)])[0]
        x = torch.cat([m.decoder.tok_embeddings(pre), img, m.decoder.tok_embeddings(post)], 1)[0]
        vis = torch.zeros(x.shape[0], dtype=torch.bool)
        vis[pre.shape[1]:pre.shape[1] + img.shape[1]] = True
        T = x.shape[0]
        cos, sin = rope_cos_sin(torch.arange(T), E, c.rope_theta)

        def rms(t, w):
            return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + c.rms_eps) * w

        def per_mod(t, w_text, w_vis):
            return torch.where(vis[:, None], rms(t, w_vis), rms(t, w_text))
        for L in m.decoder.layers:
            Wqkv = L.text.qkv.weight
            Wq, Wk_t, Wv_t = Wqkv[:H * E], Wqkv[H * E:(H + K) * E], Wqkv[(H + K) * E:]
            h = per_mod(x, L.attn_norm.weight, L.vision_attn_norm.weight)
            q = h @ Wq.T
            k = torch.where(vis[:, None], h @ L.vision.k.weight.T, h @ Wk_t.T)
            v = torch.where(vis[:, None], h @ L.vision.v.weight.T, h @ Wv_t.T)
            q = apply_rope(q.view(T, H, E).transpose(0, 1)[None], cos, sin)
            k = apply_rope(k.view(T, K, E).transpose(0, 1)[None], cos, sin).repeat_interleave(H // K, 1)
            v = v.view(T, K, E).transpose(0, 1)[None].repeat_interleave(H // K, 1)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)[0].transpose(0, 1).reshape(T, D)
            x = x + a @ L.text.o.weight.T
            h = per_mod(x, L.ffn_norm.weight, L.vision_ffn_norm.weight)
            x = x + L.text.down(F.silu(L.text.gate(h)) * L.text.up(h))
        want = m.decoder.lm_head(per_mod(x, m.decoder.norm.weight, m.decoder.vision_norm.weight))
    assert (got - want).abs().max().item() < 1e-4


def test_mplug_owl2_exports_to_onnx_and_validates(tokenizer, tmp_path):
    from edgemm.export.onnx import export_onnx
    man = export_onnx(model=(_owl2(), tokenizer), out=tmp_path / "owl2", precision="fp32", threads=1, log=None,
                      seed=0)
    assert "per-modality K/V" in man["variants"] and all(f["ok"] for f in man["validation"]["stages"].values())
    from edgemm.export.trt import export_trt
    t = export_trt(model=(_owl2(), tokenizer), out=tmp_path / "owl2-trt", precision="fp16", no_build=True, threads=1,
                   log=None, seed=0)
    assert all(f["ok"] for f in t["validation"]["stages"].values())      # each branch's graph, its own K/V


def test_param_counts_match_info_arithmetic():
    from edgemm.info import param_counts
    for variant in ({}, {"n_kv_heads": 2, "qkv_bias": True}):
        m = _model(**variant)
        assert m.param_counts() == param_counts(m.cfg)


def test_kv_cache_overflow_is_an_error():
    m = _model()
    cache = KVCache.empty(m.cfg.decoder, max_len=8)
    with pytest.raises(ValueError, match="KV cache full"):
        m.forward_segment("text", torch.zeros(1, 9, dtype=torch.long), cache, 0)


def test_bridge_couples_the_modalities_and_single_branch_shares_weights():
    """Libra's bridge changes what text queries read from image rows (not text-only prompts); a single-branch
    (LLaVA) model has no vision weights of its own."""
    m = _model(vision_down_ratio=4, per_modality_norms=True, cross_modal_bridge=4)
    pre, img, post = _prompt(m)
    with torch.no_grad():
        base = m.forward_full([("text", pre), ("image", img), ("text", post)])
        base_text = m.forward_full([("text", torch.cat([pre, post], 1))])
        for layer in m.decoder.layers:
            layer.text.k_bridge.weight_B.add_(torch.randn_like(layer.text.k_bridge.weight_B))
            layer.vision.v_bridge.weight_B.add_(torch.randn_like(layer.vision.v_bridge.weight_B))
        assert torch.equal(m.forward_full([("text", torch.cat([pre, post], 1))]), base_text)
        assert (m.forward_full([("text", pre), ("image", img), ("text", post)]) - base).abs().max() > 1e-3
    s = _model(single_branch=True)
    assert s.decoder.layers[0].vision is s.decoder.layers[0].text
    assert not any(".vision." in k for k in s.state_dict() if k.startswith("decoder."))
