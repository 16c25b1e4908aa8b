"""Gated cross-attention (Idefics): import of transformers' IdeficsForVisionText2Text, logits within 1e-4 of
transformers' forward on an image+text prompt and across decode steps; the onnx / trt exports validate; gguf
refuses by name."""

import numpy as np
import pytest
import torch

from edgemm.checkpoint import load_checkpoint
from edgemm.importers import import_checkpoint

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")

FAKE, IMAGE = 64, 65          # <fake_token_around_image>, <image>: the additional vocab (decoupled embeddings)
EOS = 2


def _tokenizer(d):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 64)},
             "<fake_token_around_image>": FAKE, "<image>": IMAGE}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<fake_token_around_image>", "<image>"])
    tok.save(str(d / "tokenizer.json"))


def _tiny_idefics(alpha_type="vector", qk_norms=True, seed=0):
    from transformers import IdeficsConfig, IdeficsForVisionText2Text
    # transformers cannot build float gates with the normal initializer (torch.normal(size=(1))): float gates
    # start at zero and are randomised below with everything else
    init = {"alpha_initializer": "normal", "alphas_initializer_range": 0.5} if alpha_type == "vector" else {}
    cfg = IdeficsConfig(
        vocab_size=64, additional_vocab_size=2, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
        num_attention_heads=4, cross_layer_interval=2, qk_layer_norms=qk_norms, alpha_type=alpha_type,
        use_resampler=True, max_position_embeddings=128, rms_norm_eps=1e-6, eos_token_id=EOS, **init,
        vision_config=dict(embed_dim=24, image_size=16, patch_size=4, intermediate_size=40, num_hidden_layers=2,
                           num_attention_heads=2),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=5, resampler_depth=2, resampler_n_heads=2,
                              resampler_head_dim=8, qk_layer_norms_perceiver=qk_norms))
    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(cfg).eval()
    if alpha_type == "vector":
        a = model.model.gated_cross_attn_layers[0].alpha_cross_attn
        assert a.abs().min() > 0            # the gates are really open (tanh(0) = 0 would prove nothing)
    with torch.no_grad():                 # weights well away from init (norm gains, latents, gates included)
        g = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def _image_mask(ids, n_images):
    """Idefics' processor rule (its own functions): a token reads the latest image; none after </s>."""
    from transformers.models.idefics.processing_idefics import (image_attention_mask_for_packed_input_ids,
                                                                incremental_to_binary_attention_mask)

    class Tok:
        eos_token_id = EOS

        @staticmethod
        def convert_tokens_to_ids(t):
            return IMAGE
    inc, _ = image_attention_mask_for_packed_input_ids(ids.clone(), Tok, "pt")
    return incremental_to_binary_attention_mask(inc, "pt", num_classes=n_images)


def _import(tmp_path, **kw):
    model = _tiny_idefics(**kw)
    src = tmp_path / "idefics-tiny-hf"
    model.save_pretrained(src, safe_serialization=True)
    _tokenizer(src)
    out = tmp_path / "idefics-edgemm"
    summary = import_checkpoint(src, out, log=None)
    return model, out, summary


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """One imported tiny Idefics (vector gates, qk norms) for the export tests."""
    return _import(tmp_path_factory.mktemp("idefics"))[1]


@pytest.mark.parametrize("alpha_type,qk_norms", [("vector", True), ("float", False)])
def test_idefics_import_matches_transformers(alpha_type, qk_norms, tmp_path):
    model, out, summary = _import(tmp_path, alpha_type=alpha_type, qk_norms=qk_norms)
    assert summary["family"] == "idefics"
    assert "gated cross-attention" in summary["variants"]
    m, _ = load_checkpoint(out)
    from edgemm.info import checkpoint_param_counts
    assert checkpoint_param_counts(out) == m.param_counts()     # `edgemm info`'s count, from the file headers
    assert m.cfg.decoder.vocab_size == 66 and m.cfg.n_image_rows == 3
    assert (m.cfg.decoder.cross_attn_image_token, m.cfg.decoder.cross_attn_image_wrap) == (IMAGE, FAKE)
    g = torch.Generator().manual_seed(5)
    px = torch.randn(2, 3, 16, 16, generator=g)
    w = lambda n: torch.randint(3, 64, (1, n), generator=g)             # noqa: E731
    # text before any image (gate 0), image 1, text with a </s> (tokens after it read no image), image 2, text;
    # the processor writes each image as <fake_token_around_image> <image> <fake_token_around_image>
    segs = [("text", w(3)), ("image", 0), ("text", torch.cat([w(3), torch.tensor([[EOS]]), w(2)], 1)),
            ("image", 1), ("text", w(4))]
    ids = torch.cat([d if k == "text" else torch.tensor([[FAKE, IMAGE, FAKE]]) for k, d in segs], 1)
    mask = _image_mask(ids, 2)
    assert mask[0, :4].sum() == 0 and mask[0, 10:13].sum() == 0 and mask[0, -1, 1] == 1   # the rules are exercised
    from edgemm.model import KVCache
    with torch.no_grad():
        out_hf = model(input_ids=ids, pixel_values=px[None], image_attention_mask=mask, use_cache=True)
        ref = out_hf.logits[0]
        lat = [m.encode_image(px[i:i + 1]) for i in range(2)]
        mine = [(k, lat[d] if k == "image" else d) for k, d in segs]
        got = m.forward_full(mine)[0]
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() <= 1e-4
        cache, pos = KVCache.empty(m.cfg.decoder, max_len=64), 0
        for kind, data in mine:
            lg, pos = m.forward_segment(kind, data, cache, pos)
        assert (lg[0, -1] - ref[-1]).abs().max().item() <= 1e-4
        # decode steps: transformers with its KV cache (past_key_values), edgemm with its cache
        past, all_ids = out_hf.cache, ids
        for _ in range(4):
            t = int(lg[0, -1].argmax())
            all_ids = torch.cat([all_ids, torch.tensor([[t]])], 1)
            step_mask = _image_mask(all_ids, 2)[:, -1:]
            o = model(input_ids=all_ids[:, -1:], pixel_values=px[None], image_attention_mask=step_mask,
                      cache=past, use_cache=True)
            past = o.cache
            lg, pos = m.forward_segment("text", torch.tensor([[t]]), cache, pos)
            assert (lg[0, -1] - o.logits[0, -1]).abs().max().item() <= 1e-4


def _prompt_check(ref_model, b, n_images=2, decode_steps=3):
    """The backend against the reference over text, then n_images x (image, text), then greedy decode steps."""
    from edgemm.export.graph import input_examples
    from edgemm.export.validate import TorchReference, run_prompt
    cfg = ref_model.cfg
    g = torch.Generator().manual_seed(11)
    ins = input_examples(cfg, g)
    segs = [("text", [1, 5])]
    for _ in range(n_images):
        segs += [("image", None), ("text", [7, EOS, 9, 8])]
    ref = TorchReference(ref_model, 64)
    return run_prompt(ref, b, cfg, ins, segs, decode_steps)


def test_idefics_onnx_export_validates_and_ort_runs_it(ck, tmp_path):
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    from edgemm.export.onnx import export_onnx
    from edgemm.runtimes.ort_backend import OrtBackend
    man = export_onnx(str(ck), tmp_path / "bundle", precision="fp32", log=None)
    assert list(man["stages"]) == ["vision", "cross_kv", "decoder_text"]
    val = man["validation"]["stages"]
    assert set(val) == {"vision", "cross_kv", "decoder_text"} and all(f["ok"] for f in val.values())
    assert val["cross_kv"]["compared"] == 1 and val["decoder_text"]["compared"] >= 8
    b = OrtBackend.open(bundle=str(tmp_path / "bundle"), device="cpu")
    m, _ = load_checkpoint(ck)
    res = _prompt_check(m, b)
    assert max(r[0] for rows in res.values() for r in rows) <= 1e-4
    assert len(res["decoder_text"]) == 1 + 2 * 2 + 3
    # the image's K/V live beside the KV cache: a decode step feeds them, it does not recompute them
    st = b.new_state(32)
    b.text(st, [1, 4])
    b.image(st, b.vision(np.zeros((1, 3, 16, 16), np.float32)))
    kv = st.extra["cross"]
    b.text(st, [5])
    assert st.extra["cross"] is kv and st.length == 6
    # `edgemm run --bundle B --image X q` answers as the torch reference on the checkpoint does
    from click.testing import CliRunner
    from PIL import Image
    from edgemm.cli import main
    Image.fromarray((np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)).save(tmp_path / "x.png")
    q = ["--image", str(tmp_path / "x.png"), "--max-new-tokens", "6", "w5 w6 w7"]
    r1 = CliRunner().invoke(main, ["run", "--bundle", str(tmp_path / "bundle"), "--backend", "ort", *q])
    r2 = CliRunner().invoke(main, ["run", "--model", str(ck), "--backend", "torch", *q])
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    ans = lambda out: [ln for ln in out.splitlines() if ln.strip()][-1]       # noqa: E731
    assert ans(r1.output) == ans(r2.output) and ans(r1.output).startswith("w")


def test_idefics_fp16_compute_for_cuda_validates_and_runs_on_the_cpu(ck, tmp_path):
    """export --precision fp16 --device cuda: the cross_kv stage and the decoder in fp16 (cross K/V fp16 beside an
    fp16 KV cache); on the CPU the prompt with two images and decode steps stays within fp16 error of the reference."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    import onnx
    from edgemm.export.onnx import export_onnx
    from edgemm.runtimes.ort_backend import OrtBackend
    man = export_onnx(str(ck), tmp_path / "b", precision="fp16", device="cuda", log=None)
    assert all(f["ok"] for f in man["validation"]["stages"].values())
    assert {s["compute"] for s in man["stages"].values()} == {"fp16"}
    types = {v.name: v.type.tensor_type.elem_type for f in ("cross_kv", "decoder_text")
             for g in [onnx.load(str(tmp_path / "b" / f"{f}.onnx")).graph] for v in [*g.input, *g.output]}
    assert types["cross_key.0"] == types["past_key.0"] == onnx.TensorProto.FLOAT16
    assert types["image_rows"] == types["cross_gate"] == types["logits"] == onnx.TensorProto.FLOAT
    b = OrtBackend.open(bundle=str(tmp_path / "b"), device="cpu")
    m, _ = load_checkpoint(ck)
    res = _prompt_check(m, b)
    scale = max(r[2] for rows in res.values() for r in rows)
    assert max(r[0] for rows in res.values() for r in rows) <= 2e-2 * max(1.0, scale)
    assert min(r[1] for r in res["decoder_text"]) >= 0.999


def test_gguf_refuses_gated_cross_attention_naming_the_targets_that_can(ck, tmp_path):
    from edgemm.errors import UnsupportedVariant
    from edgemm.export.gguf import export_gguf
    with pytest.raises(UnsupportedVariant, match=r"'gated cross-attention'; targets that can: onnx, trt"):
        export_gguf(str(ck), tmp_path / "gguf", log=None)
    assert not (tmp_path / "gguf").exists()
    from edgemm.errors import EdgemmError
    from edgemm.export.onnx import check_variants
    from edgemm.info import param_counts
    m, _ = load_checkpoint(ck)
    with pytest.raises(EdgemmError, match="quantized precisions are not available for gated cross-attention"):
        check_variants(m.cfg, "the onnx exporter", {"vision": "fp32", "decoder": "int8"})
    real = sum(p.numel() for p in m.parameters())        # `edgemm info`'s count from the config alone
    assert abs(sum(param_counts(m.cfg).values()) - real) <= 0.01 * real


def test_idefics_trt_graphs_validate_on_the_cpu(ck, tmp_path):
    """The trt bundle's standard-op graphs (decoder_text with the cross K/V inputs, the cross_kv stage) in ONNX
    Runtime against the reference, as the trt exporter checks them; engines are built on a device."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    from edgemm.export.trt import export_trt
    from edgemm.runtimes.trt_backend import OnnxQdqBackend
    man = export_trt(str(ck), tmp_path / "trt", precision="fp16", no_build=True, log=None)
    assert {s: man["stages"][s]["graph"] for s in man["stages"]} == {
        "vision": "onnx-standard", "cross_kv": "onnx-standard", "decoder_text": "onnx-standard-kv-window"}
    assert all(f["ok"] for f in man["validation"]["stages"].values())
    prof = man["trt"]["profiles"]["workstation"]
    assert "decoder_image" not in prof and prof["decoder_text"]["cross_key.1"]["max"] == [1, 4, 5, 8]
    m, _ = load_checkpoint(ck)
    res = _prompt_check(m, OnnxQdqBackend.open(bundle=str(tmp_path / "trt")))
    assert max(r[0] for rows in res.values() for r in rows) <= 1e-4
