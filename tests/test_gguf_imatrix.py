"""llama.cpp importance matrices from the calibration set's text and image rows (export/gguf_imatrix.py, issue 33)."""
from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import requires_demo
from tests.test_gguf import needs_llama

torch = pytest.importorskip("torch")


def ggml_q8k_round_trip(x: np.ndarray) -> np.ndarray:
    """Rows [m, n] through ggml's own Q8_K (libggml-base of llama-cpp-python: quantize_row_q8_K_ref, then
    dequantize_row_q8_K): the activations ggml's CPU kernels multiply with Q4_K / Q6_K weights."""
    import ctypes
    from pathlib import Path
    import llama_cpp
    lib = ctypes.CDLL(str(next((Path(llama_cpp.__file__).parent / "lib").glob("libggml-base.so*"))))
    x = np.ascontiguousarray(x, np.float32)
    blocks = ctypes.create_string_buffer(x.size // 256 * (4 + 256 + 2 * 16))        # block_q8_K: d, qs, bsums
    out = np.empty_like(x)
    fp = ctypes.POINTER(ctypes.c_float)
    lib.quantize_row_q8_K_ref(x.ctypes.data_as(fp), blocks, ctypes.c_int64(x.size))
    lib.dequantize_row_q8_K(blocks, out.ctypes.data_as(fp), ctypes.c_int64(x.size))
    return out


@pytest.fixture(scope="module")
def model_and_stats():
    """tiny-shapes-outliers, its statistics over 2 calibration samples, and the sums of x^2 of two layers' inputs
    as ggml's kernels multiply them (Q8_K-rounded by ggml itself), accumulated by hooks of the test's own (image
    rows: vision.down of layer 0; text rows: text.qkv of layer 1)."""
    from edgemm.calib.stats import collect_stats
    from edgemm.checkpoint import load_model
    m, tok = load_model("tiny-shapes-outliers")
    mine = {}

    def hook(name):
        def f(_mod, inputs):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1]).numpy()
            s, n = mine.get(name, (0, 0))
            mine[name] = (s + (ggml_q8k_round_trip(x).astype(np.float64) ** 2).sum(0), n + len(x))
        return f
    hs = [m.decoder.layers[0].vision.down.register_forward_pre_hook(hook("blk.0.vis_down.weight")),
          m.decoder.layers[1].text.qkv.register_forward_pre_hook(hook("blk.1.attn_qkv.weight"))]
    try:
        st = collect_stats((m, tok), None, n=2, cache=False, progress=False, log=None, model_digest="imatrix-test")
    finally:
        for h in hs:
            h.remove()
    return m, tok, st, mine


@requires_demo
@needs_llama
def test_imatrix_read_back_by_llama_quantizer(model_and_stats, tmp_path):
    """The imatrix file (llama.cpp's GGUF format) holds each tensor's sums of x^2 over its own branch's rows, x as
    ggml's CPU kernels multiply it with K-quant weights (Q8_K-rounded: float sums differ, by far on the outlier
    model's runs with an outlier, and made q4_k_m with the matrix worse than without it in llama.cpp); read
    back and handed to llama_model_quantize it is used: q4_k_m weights differ from the quantization without it, and
    their error weighted by the matrix is lower; the quantized file carries the quantize.imatrix.* keys."""
    import gguf
    from gguf.quants import dequantize
    from edgemm.export.gguf import write_decoder_gguf
    from edgemm.export.gguf_imatrix import imatrix_entries, read_imatrix, write_imatrix
    from edgemm.export.gguf_quant import quantize_decoder
    m, tok, st, mine = model_and_stats
    entries = imatrix_entries(st, "cogvlm")
    assert len(entries) == 3 * 10 + 1                         # 3 layers x (5 text + 5 vision) + output.weight
    path = write_imatrix(tmp_path / "imatrix.gguf", entries, ["bundled calib"], 2)
    values, meta = read_imatrix(path)
    assert meta == {"datasets": ["bundled calib"], "chunk_count": 2, "entries": 31}
    for name, (s, n) in mine.items():                         # the test's own hooks: the same sums, the same rows
        assert entries[name][1] == n
        np.testing.assert_allclose(values[name], s / n, rtol=1e-4, atol=1e-6 * float(np.max(s / n)))
    # image rows' outliers reach vis_down (x64), text rows' reach ffn_down (x8): the matrices say so
    assert values["blk.0.vis_down.weight"].max() > 20 * values["blk.0.ffn_down.weight"].max()
    write_decoder_gguf(m, tok, tmp_path / "f32.gguf", "t")
    quantize_decoder(tmp_path / "f32.gguf", tmp_path / "plain.gguf", "q4_k_m", 1)
    got_meta = quantize_decoder(tmp_path / "f32.gguf", tmp_path / "imx.gguf", "q4_k_m", 1, imatrix=path)
    assert got_meta == meta
    tensors = {f: {t.name: t for t in gguf.GGUFReader(str(tmp_path / f)).tensors}
               for f in ("f32.gguf", "plain.gguf", "imx.gguf")}
    lower = 0
    for name, w in values.items():
        W = np.asarray(tensors["f32.gguf"][name].data, np.float32)
        a, b = (dequantize(tensors[f][name].data, tensors[f][name].tensor_type).reshape(W.shape)
                for f in ("plain.gguf", "imx.gguf"))
        assert np.abs(a - b).max() > 0, name                  # the quantizer took this tensor's matrix
        lower += float(((W - b) ** 2 * w).sum()) < float(((W - a) ** 2 * w).sum())
    assert lower == len(values)
    f = gguf.GGUFReader(str(tmp_path / "imx.gguf")).fields
    assert int(f["quantize.imatrix.entries_count"].parts[-1][0]) == 31
    assert bytes(f["quantize.imatrix.file"].parts[-1]).decode() == "imatrix.gguf"


def test_imatrix_refuses_other_files(tmp_path):
    from edgemm.errors import EdgemmError
    from edgemm.export.gguf_imatrix import read_imatrix
    (tmp_path / "x.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(EdgemmError, match="not a GGUF imatrix"):
        read_imatrix(tmp_path / "x.gguf")


def test_imatrix_flag_is_for_gguf():
    from click.testing import CliRunner
    from edgemm.cli import main
    r = CliRunner().invoke(main, ["export", "--target", "onnx", "--imatrix", "-o", "/nonexistent/x"])
    assert r.exit_code == 2 and "--imatrix applies to --target gguf" in r.output


def test_imatrix_default_only_for_kquants_with_a_calibration_set():
    from edgemm.errors import EdgemmError
    from edgemm.export.gguf import _wants_imatrix
    said = []
    assert _wants_imatrix("q4_k_m", None, "calib-dir", None, said.append)
    assert not _wants_imatrix("q4_k_m", None, None, None, said.append)
    assert not _wants_imatrix("q8_0", None, "calib-dir", None, said.append) and "--imatrix to use it" in said[-1]
    assert _wants_imatrix("q8_0", True, None, None, said.append)
    assert not _wants_imatrix("q4_k_m", False, "calib-dir", None, said.append)
    with pytest.raises(EdgemmError, match="unquantized"):
        _wants_imatrix("f16", True, None, None, said.append)


@needs_llama
def test_q8k_round_is_ggmls():
    """calib.stats.q8k_round (numpy) equals ggml's own Q8_K round trip, on rows with outliers and zero runs."""
    from edgemm.calib.stats import q8k_round
    x = np.random.default_rng(0).standard_normal((8, 512)).astype(np.float32)
    x[:, 7] *= 64
    x[1, 300] = -900.0
    x[2, 256:] = 0
    np.testing.assert_array_equal(q8k_round(x), ggml_q8k_round_trip(x))
