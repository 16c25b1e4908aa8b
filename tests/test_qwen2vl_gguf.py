"""gguf for Qwen2-VL / Qwen2.5-VL: llama.cpp's qwen2vl decoder (Qwen2 + M-RoPE, rope.dimension_sections) and a
qwen2vl_merger / qwen2.5vl_merger mmproj as llama.cpp's converter writes them, against transformers'
Qwen2VLForConditionalGeneration / Qwen2_5_VLForConditionalGeneration on tiny random instances (real 14 px patches;
2.5 with the released 112 px windows, every second block full): stock llama-cpp-python's own mtmd on transformers'
chat prompt (same prompt ids, logits, greedy tokens), and edgemm's llamacpp backend (`edgemm run --image`, serve,
an image in pieces, rewinds, --gguf-vision onnx)."""
import io
import json

import numpy as np
import pytest
import torch

from .test_import_llava import gguf_bundles_answer, gguf_exports, greedy_ids
from .test_qwen2vl import QUESTION, _image, _logits, _messages, _reference, _save

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")
pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'edgemm[gguf]')")

PATCH = 14                              # 28 px cells, as the releases
WIDE = (168, 112)                       # 6 x 4 cells: 24 rows (mtmd's default floor is 8 an image)


@pytest.fixture(scope="module", params=[False, True], ids=["qwen2-vl", "qwen2.5-vl"])
def imported(request, tmp_path_factory):
    over = dict(window_size=112, depth=4, fullatt_block_indexes=[1, 3]) if request.param else {}
    return _save(tmp_path_factory.mktemp("qwen2vl-gguf"), request.param, patch=PATCH, **over)


@pytest.fixture(scope="module")
def gguf_bundles(imported):
    """`edgemm export --target gguf` at f32 and q8_0 (each validated by the exporter)."""
    return gguf_exports(imported["ck"], imported["dir"])


def _wants(imported, img):
    hf, proc = imported["hf"], imported["proc"]
    hf_in, _ = _reference(hf, proc, [img], 1)
    eos = set(json.loads((imported["ck"] / "config.json").read_text())["tokens"]["eos"])
    return hf_in, _logits(hf, hf_in), eos


def test_gguf_files_are_llama_cpps_qwen2vl(imported, gguf_bundles):
    """The decoder as llama.cpp's qwen2vl with the M-RoPE sections, the mmproj as convert_hf_to_gguf.py's
    Qwen2VLVisionModel writes it (projector qwen2vl_merger / qwen2.5vl_merger, the Conv3d's two frame kernels, as
    transformers' has them, 2.5's n_wa_pattern); the f32 export validates: llama.cpp's decoder on the reference's rows at
    their 3-D positions within 1e-3 of the reference, mtmd's rows within the mtmd bound; q8_0 validates."""
    from gguf import GGUFReader
    hf = imported["hf"]
    v25 = hf.config.model_type == "qwen2_5_vl"
    d, man, out = gguf_bundles["f32"]
    assert man["stages"]["decoder"]["format"] == "gguf (arch qwen2vl)"
    dec = GGUFReader(str(d / man["stages"]["decoder"]["file"])).fields
    assert list(dec["qwen2vl.rope.dimension_sections"].contents()) == [2, 1, 1, 0]
    v = GGUFReader(str(d / man["stages"]["vision"]["file"]))
    f = v.fields
    assert f["clip.projector_type"].contents() == ("qwen2.5vl_merger" if v25 else "qwen2vl_merger")
    assert ("clip.use_silu" in f) == v25 and "clip.use_gelu" not in f           # 2-VL: QuickGELU (the default)
    if v25:
        assert f["clip.vision.n_wa_pattern"].contents() == 2
    tv = {x.name: np.asarray(x.data).reshape([int(s) for s in reversed(x.shape)]) for x in v.tensors}
    k = hf.model.visual.patch_embed.proj.weight.detach().numpy()                # [W, 3, 2, p, p]
    assert np.array_equal(tv["v.patch_embd.weight"], k[:, :, 0]) and np.array_equal(tv["v.patch_embd.weight.1"],
                                                                                    k[:, :, 1])   # (as the converter)
    assert np.array_equal(tv["mm.2.weight"], hf.model.visual.merger.mlp[2].weight.detach().numpy())
    val = man["validation"]
    assert val["passed"] and val["tokenization_equal"], val
    assert val["text_max_abs"] < 1e-3 and val["image_max_abs"] < 1e-3, val          # (LOGIT_TOL["f32"])
    assert val["vision_rows_max_abs"] is not None and val["image_mtmd_top1_equal"], val
    assert "erf form" in out                       # the merger's GELU: llama.cpp computes the tanh form, said
    assert gguf_bundles["q8_0"][1]["validation"]["passed"]


def test_gguf_stock_llama_cpp_agrees_with_transformers(imported, gguf_bundles):
    """The f32 files in stock llama-cpp-python's low-level mtmd API (mtmd_tokenize + mtmd_helper_eval_chunks: its
    own resize, <|vision_start|> / <|vision_end|> and M-RoPE positions) on transformers' own chat prompt: the same
    prompt ids (the image's rows where transformers puts <|image_pad|>), logits within 1e-3 (ggml's tanh GELU in the
    merger, fp16-table) and the same greedy tokens."""
    from PIL import Image
    from edgemm.llamacpp import load_llama_cpp
    from .test_smolvlm import _stock_mtmd
    d, man, _ = gguf_bundles["f32"]
    img = _image(*WIDE, 5)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    load_llama_cpp()
    hf_in, logits, eos = _wants(imported, Image.open(io.BytesIO(buf.getvalue())))
    want_ids = hf_in["input_ids"][0].tolist()
    proc = imported["proc"]
    text = proc.apply_chat_template(_messages(), add_generation_prompt=True).replace(
        "<|vision_start|><|image_pad|><|vision_end|>", "<image>")           # mtmd writes the vision tokens itself
    ids, stock, answer = _stock_mtmd(d / man["stages"]["decoder"]["file"], d / man["stages"]["vision"]["file"],
                                     text, buf.getvalue(), 3)
    image = imported["hf"].config.image_token_id
    assert [image if t is None else t for t in ids] == want_ids
    with torch.no_grad():
        want = logits(want_ids)[-1].numpy()
        greedy = greedy_ids(logits, want_ids, eos, 3)
    assert stock.argmax() == want.argmax() and np.abs(stock - want).max() < 1e-3, np.abs(stock - want).max()
    assert answer[:len(greedy)] == greedy and greedy


def test_gguf_run_image_answers_as_transformers(imported, gguf_bundles, monkeypatch):
    """`edgemm run --image` on the f32 and q8_0 bundles (edgemm's llamacpp backend: the host's resize, mtmd's rows
    at their 3-D positions in a 4-positions-a-row embedding batch) and `edgemm serve` of the f32 one answer
    transformers' greedy ids, on an image the processor resizes (smart_resize)."""
    from PIL import Image
    from .test_smolvlm import _served_answer
    d = imported["dir"]
    _image(150, 80, 7).save(d / "img-gguf.png")
    hf_in, logits, eos = _wants(imported, Image.open(d / "img-gguf.png"))
    want = greedy_ids(logits, hf_in["input_ids"][0].tolist(), eos)
    gguf_bundles_answer(monkeypatch, gguf_bundles, d / "img-gguf.png", QUESTION, want)
    _served_answer(gguf_bundles["f32"][0], d / "img-gguf.png", len(hf_in["input_ids"][0]), want,
                   json.loads((imported["ck"] / "config.json").read_text())["tokens"], QUESTION)


def test_gguf_backend_pieces_and_rewinds(imported, gguf_bundles):
    """The llamacpp backend: an image appended in pieces of 5 rows (serve --prefill-chunk) gives the logits, next
    position and following step one piece does; a state rewound to before the text after the image (KV rows and
    positions part there) recomputes the same logits; the logits equal the torch reference's within 1e-3."""
    from edgemm.tilings import image_rows
    from runtimes import load_backend
    from runtimes.base import last
    b = load_backend("llamacpp", bundle=str(gguf_bundles["f32"][0]), device="cpu")
    t = load_backend("torch", model=str(imported["ck"]), device="cpu")
    out = []
    for be, chunk in ((b, None), (b, 5), (t, None)):
        rows = image_rows(be, _image(*WIDE, 3))                             # 6 x 4 cells
        st = be.new_state(max_len=128)
        be.text(st, [1, 2, 3])
        got = last(be.prefill(st, "image", rows, chunk))
        out.append((got, st.pos, st.length, be.text(st, [4, 5])))
        if be is b:
            st.length, st.pos = 3 + 24, 3 + 6
            again = be.text(st, [4, 5])
            assert np.abs(again - out[-1][3]).max() < 1e-5
    (a, pa, la, sa), (c, pc, lc, sc), (r, pr, lr, sr) = out
    assert (pa, la) == (pc, lc) == (pr, lr) == (3 + 6, 3 + 24)
    assert np.abs(a - c).max() < 1e-5 and np.abs(sa - sc).max() < 1e-5
    assert np.abs(sa - sr).max() < 1e-3, np.abs(sa - sr).max()
    b.close()


def test_gguf_refuses_what_llama_cpp_cannot(imported, tmp_path):
    """Windows other than llama.cpp's fixed 112 px (a 2.5 model) are refused in one line naming the reason."""
    import shutil
    from click.testing import CliRunner
    from edgemm.cli import main
    if imported["hf"].config.model_type != "qwen2_5_vl":
        pytest.skip("window attention is Qwen2.5-VL's")
    ck = tmp_path / "ck"
    shutil.copytree(imported["ck"], ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg["vision"]["window_px"] = 56
    (ck / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(main, ["export", "--model", str(ck), "--target", "gguf", "-o", str(tmp_path / "g")])
    assert r.exit_code == 2 and "112 px windows" in r.output and "Traceback" not in r.output, r.output


def test_gguf_onnx_vision_stage(imported, monkeypatch):
    """`--gguf-vision onnx`: the qwen2vl decoder GGUF beside the tower as ONNX (exact: no GELU warning) validates,
    and `edgemm run --image` on it (ONNX Runtime's rows fed at their M-RoPE positions) answers transformers' ids."""
    from PIL import Image
    from click.testing import CliRunner
    from edgemm.cli import main
    from .test_import_llava import record_answers
    if imported["hf"].config.model_type != "qwen2_vl":
        pytest.skip("the same path for both; once is enough")
    d = imported["dir"]
    r = CliRunner().invoke(main, ["export", "--model", str(imported["ck"]), "--target", "gguf", "--precision", "f32",
                                  "--gguf-vision", "onnx", "-o", str(d / "gguf-onnxv")])
    assert r.exit_code == 0 and "GELU" not in r.output, r.output
    man = json.loads((d / "gguf-onnxv" / "edgemm.json").read_text())
    assert man["validation"]["passed"] and man["stages"]["vision"]["format"] == "onnx"
    _image(150, 80, 7).save(d / "img-onnxv.png")
    hf_in, logits, eos = _wants(imported, Image.open(d / "img-onnxv.png"))
    want = greedy_ids(logits, hf_in["input_ids"][0].tolist(), eos)
    got = record_answers(monkeypatch)
    r = CliRunner().invoke(main, ["run", "--bundle", str(d / "gguf-onnxv"), "--backend", "llamacpp", "--image",
                                  str(d / "img-onnxv.png"), "--max-new-tokens", "4", QUESTION])
    assert r.exit_code == 0 and got == [want] and want, (r.output, got, want)
