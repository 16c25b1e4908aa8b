"""LLaVA-UHD (thunlp/LLaVA-UHD, branch LLaVA-UHD-v1): a tiny checkpoint written here in the released layout
(haotian-liu/LLaVA's flat config + `adapt_spatial_resampler` under model.mm_projector, the CLIP tower in its own
folder), imported and checked against a plain re-computation from the released code's equations: the slicing
(slice_process.py's slice_image_minicpm, resize_image_keep_ratio), torchvision's roi_align over
slice_image_feature_minicpm's boxes, the resampler (AdaptSpatialResampler.forward with nn.MultiheadAttention), the
tower (transformers' CLIPVisionModel with its position table interpolated, as AdaptCLIPVisionEmbeddings does), the
spatial schema (llava_arch.prepare_inputs_labels_for_multimodal) and transformers' LlamaForCausalLM over the
embeddings; then `edgemm run --image` on the checkpoint and on onnx bundles (fp32, int8: validated)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")
S, P, Q, D, W = 28, 4, 9, 256, 64          # tower image / patch size, queries (3 x 3), LM width, tower width
VOCAB, NEWLINE, DOT = 29900, 13, 29892      # the release's separator ids need Vicuna-sized vocabularies
SIZES = ((1024, 1024), (2000, 500), (500, 2000), (300, 200), (1200, 700), (20, 400))


# --------------------------------------------------------------------------- the released code's equations
def release_slices(img, max_slice_nums=7, scale_resolution=28, patch_size=4):
    """slice_process.py: resize_image_keep_ratio(1024) then slice_image_minicpm, as the eval scripts call them ->
    (source PIL image, [slices], best_grid, ind_tokens)."""
    from PIL import Image
    w0, h0 = img.size
    if w0 > h0:
        img = img.resize((1024, int((1024 / w0) * h0)), Image.Resampling.BICUBIC)
    else:
        img = img.resize((int((1024 / h0) * w0), 1024), Image.Resampling.BICUBIC)

    def ensure_divide(length, p):
        return max(math.floor(length / p) * p, p)

    def find_best_resize(size, allow_upscale=False):
        width, height = size
        if (width * height > scale_resolution * scale_resolution) or allow_upscale:
            r = width / height
            height = int(scale_resolution / math.sqrt(r))
            width = int(height * r)
        return ensure_divide(width, patch_size), ensure_divide(height, patch_size)

    ow, oh = img.size
    log_ratio = math.log(ow / oh)
    multiple = min(math.ceil(ow * oh / (scale_resolution * scale_resolution)), max_slice_nums)
    if multiple <= 1:
        return img.resize(find_best_resize(img.size, True), Image.Resampling.BICUBIC), [], None, []
    nums = [i for i in (multiple - 1, multiple, multiple + 1) if i != 1 and i <= max_slice_nums]
    source = img.copy().resize(find_best_resize(img.size), Image.Resampling.BICUBIC)
    grids = [[m, n // m] for n in nums for m in range(1, n + 1) if n % m == 0]
    best, err = [1, 1], float("inf")
    for g in grids:
        e = abs(log_ratio - math.log(g[0] / g[1]))
        if e < err:
            best, err = g, e
    gw = ensure_divide(ow, best[0]) / best[0]
    gh = ensure_divide(oh, best[1]) / best[1]
    bw, bh = find_best_resize((gw, gh), allow_upscale=True)
    refine = img.resize((bw * best[0], bh * best[1]), Image.Resampling.BICUBIC)
    width, height = refine.size
    gx, gy = int(width / best[0]), int(height / best[1])
    patches = [refine.crop((j, i, j + gx, i + gy)) for i in range(0, height, gy) for j in range(0, width, gx)]
    ind = [DOT if i != best[0] - 1 else NEWLINE for _ in range(best[1]) for i in range(best[0])]
    return source, patches, best, ind


def release_boxes(h: int, w: int, num_windows: int):
    """slice_image_feature_minicpm's region boxes [n, 4] (x1, y1, x2, y2, float32) and the feature's w / h ratio."""
    ratio = h * w / num_windows
    ch = math.sqrt(ratio / (w / h))
    cw = ch * (w / h)
    rows, cols = int(round(h / ch)), int(round(w / cw))
    assert rows * cols == num_windows
    return torch.tensor([[j * cw, i * ch, j * cw + cw, i * ch + ch] for i in range(rows) for j in range(cols)],
                        dtype=torch.float32), w / h


def release_pooling_size(wh_ratio: float):
    best, err = (3, 3), float("inf")
    for w, h in [(4, 2), (3, 2), (4, 3), (3, 3), (2, 4), (2, 3), (3, 4)]:
        e = abs(math.log(wh_ratio) - math.log(w / h))
        if e < err:
            best, err = (h, w), e
    return best


def roi_align(feat, boxes, out_hw):
    """torchvision's roi_align (spatial_scale 1, sampling_ratio -1, aligned False) as its CPU kernel computes it,
    one sample at a time: feat [C, H, W] -> [n, C, oh, ow]."""
    C, H, Wd = feat.shape
    oh, ow = out_hw
    f32 = np.float32
    out = torch.zeros(len(boxes), C, oh, ow)
    for n, (x1, y1, x2, y2) in enumerate(boxes.tolist()):
        x1, y1, x2, y2 = f32(x1), f32(y1), f32(x2), f32(y2)
        rw, rh = max(f32(x2 - x1), f32(1)), max(f32(y2 - y1), f32(1))
        bh, bw = f32(rh / f32(oh)), f32(rw / f32(ow))
        gh, gw = math.ceil(rh / oh), math.ceil(rw / ow)
        for ph in range(oh):
            for pw in range(ow):
                acc = torch.zeros(C)
                for iy in range(gh):
                    y = f32(y1 + f32(ph) * bh + f32(f32(iy + 0.5) * bh / f32(gh)))
                    for ix in range(gw):
                        x = f32(x1 + f32(pw) * bw + f32(f32(ix + 0.5) * bw / f32(gw)))
                        if y < -1.0 or y > H or x < -1.0 or x > Wd:
                            continue
                        yy, xx = max(y, f32(0)), max(x, f32(0))
                        yl, xl = int(yy), int(xx)
                        yh, xh = (yl + 1, xl + 1)
                        if yl >= H - 1:
                            yh = yl = H - 1
                            yy = f32(yl)
                        if xl >= Wd - 1:
                            xh = xl = Wd - 1
                            xx = f32(xl)
                        ly, lx = float(yy - yl), float(xx - xl)
                        acc += ((1 - ly) * (1 - lx) * feat[:, yl, xl] + (1 - ly) * lx * feat[:, yl, xh]
                                + ly * (1 - lx) * feat[:, yh, xl] + ly * lx * feat[:, yh, xh])
                out[n, :, ph, pw] = acc / max(gh * gw, 1)
    return out


class ReleasedResampler(nn.Module):
    """AdaptSpatialResampler's parameters under its names, and its forward as released (tgt_size: the patch grid)."""

    def __init__(self, grid: int, dim: int, heads: int, kv_dim: int):
        super().__init__()
        self.num_queries = grid * grid
        self.pos_embed = nn.Parameter(torch.randn(self.num_queries, dim))
        self.query = nn.Parameter(torch.randn(self.num_queries, dim))
        self.kv_proj = nn.Linear(kv_dim, dim, bias=False)
        self.attn = nn.MultiheadAttention(dim, heads)
        self.ln_q, self.ln_kv, self.ln_post = (nn.LayerNorm(dim, eps=1e-6) for _ in range(3))
        self.proj = nn.Parameter(torch.randn(dim, dim) * dim ** -0.5)

    def forward(self, x, tgt_size):                         # x [1, h w, kv_dim]
        src = int(math.sqrt(self.pos_embed.size(0)))
        key_pos = F.interpolate(self.pos_embed.float().reshape(1, src, src, -1).permute(0, 3, 1, 2), size=tgt_size,
                                mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2)
        x = self.ln_kv(self.kv_proj(x))
        query = self.ln_q(self.query)[None] + self.pos_embed[None]
        key, value = x + key_pos[None], x
        query = query.reshape(-1, 1, query.shape[-1])                       # unfold(kernel 1): [Q, 1, C]
        boxes, ratio = release_boxes(*tgt_size, self.num_queries)
        size = release_pooling_size(ratio)

        def unfold(t):
            t = roi_align(t[0].t().reshape(-1, *tgt_size), boxes, size)     # [Q, C, oh, ow]
            return t.flatten(-2).permute(0, 2, 1)
        out, _ = self.attn(query.permute(1, 0, 2), unfold(key).permute(1, 0, 2), unfold(value).permute(1, 0, 2))
        return self.ln_post(out[0][None]) @ self.proj


def _tiny(seed=0):
    """transformers' CLIP tower and Llama (GQA) + the released resampler, weights away from init."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=W, intermediate_size=96, num_hidden_layers=3,
                                             num_attention_heads=2, image_size=S, patch_size=P,
                                             hidden_act="quick_gelu")).eval()
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=D, intermediate_size=384, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                      rms_norm_eps=1e-5, tie_word_embeddings=False)).eval()
    rs = ReleasedResampler(3, D, D // 128, W).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in (tower, lm, rs):
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return tower, lm, rs


def write_release(tower, lm, rs, d):
    """The checkpoint as the released code saves it: flat Llama config with the mm_* keys, model.* + lm_head,
    model.mm_projector.* (AdaptSpatialResampler's state dict), the tower in its own folder (CLIPVisionModel's)."""
    from safetensors.torch import save_file
    from .test_llava_original import _write_tokenizer
    d.mkdir(parents=True)
    sd = {k: v for k, v in lm.state_dict().items()}
    sd.update({"model.mm_projector." + k: v for k, v in rs.state_dict().items()})
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    folder = d / "clip-tiny"
    folder.mkdir()
    tower.config.to_json_file(folder / "config.json")
    save_file({k: v.detach().contiguous() for k, v in tower.state_dict().items()}, str(folder / "model.safetensors"))
    c = lm.config
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "hidden_act": "silu",
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads, "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": 1e-5, "rope_theta": 1e4, "tie_word_embeddings": False, "mm_vision_tower": "./clip-tiny",
        "mm_hidden_size": tower.config.hidden_size,
        "mm_projector_type": "adapt_spatial_resampler", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_use_im_start_end": False, "mm_patch_merge_type": "flat",
        "image_aspect_ratio": "pad", "use_mm_proj": True}))
    _write_tokenizer(d, False, False)
    return d


def _image(w, h, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 40), max(2, w // 40), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BILINEAR)


def release_rows(tower, rs, lm, img, max_slice_nums=7):
    """The image's embeddings as the release makes them: CLIP features (hidden_states[-2], CLS dropped) of each slice
    and of the source image, each resampled, the separator embeddings after each slice, the source image last."""
    from transformers import CLIPImageProcessor
    proc = CLIPImageProcessor()
    source, patches, grid, ind = release_slices(img, max_slice_nums, scale_resolution=S, patch_size=P)

    def feats(im):
        px = proc.preprocess(im, do_resize=False, do_center_crop=False, return_tensors="pt")["pixel_values"]
        hs = tower(px, output_hidden_states=True, interpolate_pos_encoding=True).hidden_states[-2][:, 1:]
        return rs(hs, (px.shape[2] // P, px.shape[3] // P))[0]
    with torch.no_grad():
        src = feats(source)
        if grid is None:
            return src, None
        emb = lm.model.embed_tokens(torch.tensor(ind))
        return torch.cat([torch.cat([feats(p), e[None]]) for p, e in zip(patches, emb)] + [src]), grid


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    from edgemm.importers import import_checkpoint
    d = tmp_path_factory.mktemp("uhd")
    tower, lm, rs = _tiny()
    src = write_release(tower, lm, rs, d / "src")
    summary = import_checkpoint(src, d / "ck", log=None)
    return {"dir": d, "src": src, "ck": d / "ck", "summary": summary, "tower": tower, "lm": lm, "rs": rs}


# --------------------------------------------------------------------------- the pieces
def test_slices_equal_the_release():
    """uhd_slices.preprocess against slice_image_minicpm (after resize_image_keep_ratio) at the release's settings
    (336 px, patch 14, 7 slices) and the tiny tower's, for wide, tall, square, small and thin images: the grid, the
    slice and source sizes and the normalised pixels; the row count is Q per image + a separator per slice."""
    from edgemm.config import VisionConfig
    from edgemm.processor import normalize
    from edgemm.uhd_slices import layout, preprocess
    for s, p in ((336, 14), (S, P)):
        v = VisionConfig(image_size=s, patch_size=p, arch="clip", tiling="uhd", max_tiles=7, longest_edge=1024,
                         image_mean=(0.48, 0.46, 0.41), image_std=(0.27, 0.26, 0.28))
        for i, (w, h) in enumerate(SIZES):
            img = _image(w, h, i)
            source, patches, grid, ind = release_slices(img, scale_resolution=s, patch_size=p)
            px = preprocess(img, v)
            assert px.grid == (tuple(grid) if grid else None), (w, h)
            want_src = normalize(source, v)
            if grid is None:
                assert np.array_equal(np.asarray(px), want_src)
                continue
            assert np.array_equal(px.source, want_src) and len(px) == len(patches) == grid[0] * grid[1]
            assert np.array_equal(np.asarray(px), np.concatenate([normalize(t, v) for t in patches]))
            assert layout(v, w, h)[2] == patches[0].size and px.shape[2:] == patches[0].size[::-1]
    assert release_slices(_image(2000, 500), 7, 336, 14)[2] == [4, 1]        # wide: one row of slices
    from PIL import Image
    from edgemm.uhd_slices import pixel_rows
    from types import SimpleNamespace
    cfg = SimpleNamespace(vision=v, adapter=SimpleNamespace(query_tokens=Q))
    for w, h in ((3000, 1), (1, 3000)):                     # (the release resizes these to 0 px and fails)
        px = preprocess(Image.new("RGB", (w, h), (200, 10, 10)), v)
        assert px.shape[0] >= 1 and min(px.shape[2:]) >= P and pixel_rows(cfg, px) >= Q


@pytest.mark.parametrize("hw", [(7, 7), (5, 9), (9, 4), (3, 12), (12, 5), (6, 6)])
def test_pool_matrices_equal_roi_align(hw):
    """pool_rows @ F @ pool_cols^T (uhd_slices.pool_matrices) equals torchvision's roi_align computed sample by
    sample over slice_image_feature_minicpm's boxes, at cal_best_pooling_size's points, for 3 x 3 and 12 x 12 query
    grids on grids of several sizes and aspect ratios."""
    from edgemm.uhd_slices import pool_matrices
    h, w = hw
    for g in (3, 12):
        if g == 12 and h * w < 30:
            continue
        feat = torch.randn(5, h, w, generator=torch.Generator().manual_seed(h * w))
        boxes, ratio = release_boxes(h, w, g * g)
        oh, ow = release_pooling_size(ratio)
        want = roi_align(feat, boxes, (oh, ow))                             # [g g, C, oh, ow]
        pr, pc = (torch.from_numpy(x) for x in pool_matrices(h, w, g))
        got = (pr @ feat @ pc.t()).reshape(5, g, oh, g, ow).permute(1, 3, 0, 2, 4).reshape(g * g, 5, oh, ow)
        assert (got - want).abs().max() <= 1e-5, (hw, g)


def test_resampler_equals_the_release(imported):
    """UhdResampler (the imported weights) against AdaptSpatialResampler.forward as released (nn.MultiheadAttention
    over each query's RoIAligned keys, the key positions interpolated to the slice's grid) on random features of
    several grid sizes; Q rows a slice, then the ',' and '\\n' embedding rows."""
    from edgemm.checkpoint import load_checkpoint
    from edgemm.uhd_slices import pool_matrices
    m, _ = load_checkpoint(imported["ck"])
    rs, lm = imported["rs"], imported["lm"]
    g = torch.Generator().manual_seed(3)
    for h, w in ((7, 7), (5, 9), (9, 4), (8, 3)):
        x = torch.randn(2, h * w, W, generator=g)
        pr, pc = (torch.from_numpy(a) for a in pool_matrices(h, w, 3))
        with torch.no_grad():
            got = m.adapter(x, pr, pc)[0]
            want = torch.cat([rs(x[i:i + 1], (h, w))[0] for i in range(2)]
                             + [lm.model.embed_tokens.weight[[DOT, NEWLINE]]])
        assert got.shape == (2 * Q + 2, D) and (got - want).abs().max() <= 1e-4, (h, w)


# --------------------------------------------------------------------------- the model
def test_import_and_logits_match_a_recomputation(imported):
    """The import (family llava_uhd, the tower from its folder) and the model's logits over a prompt with a sliced
    image, full and cached, against the release's image embeddings (release_rows) in transformers' Llama; the
    image rows of an unsliced image too; `edgemm info` counts the parameters and names the targets."""
    from edgemm.checkpoint import load_checkpoint
    from edgemm.info import checkpoint_param_counts
    from edgemm.runtimes import load_backend
    from edgemm.tilings import image_rows
    from .test_import_llava import logits_and_cached_steps_match
    assert imported["summary"]["family"] == "llava_uhd"
    m, _ = load_checkpoint(imported["ck"])
    assert checkpoint_param_counts(imported["ck"]) == m.param_counts()
    assert m.cfg.adapter.query_tokens == Q and m.cfg.adapter.resampler_heads == 2 and m.cfg.n_image_rows == 8 * Q + 7
    b = load_backend("torch", model=str(imported["ck"]))
    tower, rs, lm = imported["tower"], imported["rs"], imported["lm"]
    for i, (w, h) in enumerate(SIZES[:4]):
        img = _image(w, h, i)
        want, grid = release_rows(tower, rs, lm, img)
        got = torch.from_numpy(np.asarray(image_rows(b, img)))[0]
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-4, (w, h)
        assert m.cfg.image_rows_for(w, h) == len(want)
    b.cfg.vision.max_tiles = 1                              # max_slice_nums 1: the source image alone (unsliced)
    want, grid = release_rows(tower, rs, lm, _image(640, 480), max_slice_nums=1)
    got = torch.from_numpy(np.asarray(image_rows(b, _image(640, 480))))[0]
    assert grid is None and got.shape == want.shape == (Q, D) and (got - want).abs().max() <= 1e-4
    b.cfg.vision.max_tiles = 7
    img = _image(1200, 700, 9)
    rows, _ = release_rows(tower, rs, lm, img)
    g = torch.Generator().manual_seed(5)
    pre, post = [1] + torch.randint(10, 500, (4,), generator=g).tolist(), torch.randint(10, 500, (5,), generator=g)

    def ref_logits(ids):                                # the prompt's embeddings as prepare_inputs_labels_... makes
        e = lm.model.embed_tokens
        x = torch.cat([e(torch.tensor(pre)), rows, e(torch.tensor(ids[len(pre) + len(rows):]))])[None]
        with torch.no_grad():
            return lm(inputs_embeds=x).logits[0]
    mine = torch.from_numpy(np.asarray(image_rows(b, img)))
    segs = [("text", torch.tensor([pre])), ("image", mine), ("text", post[None])]
    logits_and_cached_steps_match(m, segs, pre + [0] * len(rows) + post.tolist(), ref_logits)
    from click.testing import CliRunner
    from edgemm.cli import main
    r = CliRunner().invoke(main, ["info", "--model", str(imported["ck"])])
    assert r.exit_code == 0 and "LLaVA-UHD slices" in r.output and "targets: onnx, trt, gguf\n" in r.output, r.output


def test_exports_validate_and_answer(imported, monkeypatch):
    """`edgemm export --target onnx` fp32 and int8 validate (ONNX Runtime runs the vision stage over slices of any
    size with their RoIAlign weights); its rows equal the reference's at several image sizes; `edgemm run --image`
    answers the checkpoint's greedy ids from the onnx fp32 bundle and the trt one (its fp16 graphs on the CPU: the
    vision stage's profiles take slices of any size and their RoIAlign weights); `--target gguf` writes llama.cpp's
    decoder beside the vision stage in ONNX (the slices cut on the host), whose rows in the llamacpp backend equal
    the release's re-computation, and `edgemm run` on it answers the same ids."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    from click.testing import CliRunner
    from edgemm.cli import main
    from edgemm.runtimes import load_backend
    from edgemm.tilings import image_rows
    from .test_import_llava import bundles_answer, record_answers
    d, ck = imported["dir"], imported["ck"]
    for prec in ("fp32", "int8"):
        r = CliRunner().invoke(main, ["export", "--model", str(ck), "--target", "onnx", "--precision", prec,
                                      "-o", str(d / f"onnx-{prec}")])
        assert r.exit_code == 0, r.output
        man = json.loads((d / f"onnx-{prec}" / "edgemm.json").read_text())
        assert all(s["ok"] for s in man["validation"]["stages"].values()), man["validation"]
    r = CliRunner().invoke(main, ["export", "--model", str(ck), "--target", "trt", "--no-build", "--precision", "fp16",
                                  "-o", str(d / "trt")])
    assert r.exit_code == 0, r.output                       # fp16 graphs, validated by ONNX Runtime
    man = json.loads((d / "trt" / "edgemm.json").read_text())
    assert all(s["ok"] for s in man["validation"]["stages"].values()), man["validation"]
    from .test_import_llava import gguf_exports
    _, man, _ = gguf_exports(ck, d, ("f32",))["f32"]
    assert man["stages"]["vision"]["format"] == "onnx" and man["validation"]["passed"], man["validation"]
    ort_b = load_backend("ort", bundle=str(d / "onnx-fp32"), device="cpu")
    torch_b = load_backend("torch", model=str(ck))
    gguf_b = load_backend("llamacpp", bundle=str(d / "gguf-f32"), threads=2)
    for i, (w, h) in enumerate(SIZES):
        got, ref = (np.asarray(image_rows(b, _image(w, h, i))) for b in (ort_b, torch_b))
        assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-4, (w, h)
        want = np.asarray(release_rows(imported["tower"], imported["rs"], imported["lm"], _image(w, h, i))[0])
        rows = np.asarray(image_rows(gguf_b, _image(w, h, i)))[0]
        assert rows.shape == want.shape and np.abs(rows - want).max() <= 1e-4, (w, h)
    gguf_b.close()
    _image(1200, 700, 7).save(d / "img.png")
    got = record_answers(monkeypatch)
    r = CliRunner().invoke(main, ["run", "--model", str(ck), "--backend", "torch", "--image", str(d / "img.png"),
                                  "--max-new-tokens", "4", "What is this?"])
    assert r.exit_code == 0 and len(got) == 1 and got[0], r.output
    monkeypatch.undo()
    bundles_answer(monkeypatch, d, d / "img.png", "What is this?", got[0],
                   bundles=(("onnx-fp32", "ort"), ("trt", "trt"), ("gguf-f32", "llamacpp")))
