"""Fuyu (transformers' FuyuForCausalLM, a Persimmon language model, no vision encoder): the imported family against
the whole model fed by FuyuProcessor (pixels, the |SPEAKER| / |NEWLINE| expansion, <s>, <0x04>) at several image
sizes (one downscaled), logits and cached decode steps; the onnx / trt exports against ONNX Runtime; the importer's
refusals in one line."""
import json

import numpy as np
import pytest
import torch

from .test_import_llava import away_from_init, exports_validate, greedy_ids, logits_and_cached_steps_match, \
    bundles_answer

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install edgemm[test])")

P = 6                                   # patch side (Fuyu-8B: 30)
CANVAS = {"height": 36, "width": 48}    # the processor's `size` (Fuyu-8B: 1080 x 1920)
QUESTION = "what colour is the cat?"
SIZES = [(20, 13), (48, 36), (7, 30), (100, 61)]   # (width, height): partial patches, the canvas, thin, downscaled
WORDS = ["▁what", "▁colour", "▁is", "▁the", "▁cat", "▁a", "▁dog", "?", "\n"]
PIECES = ["|SPEAKER|", "|NEWLINE|", "<0x00>", "<0x01>", "<0x02>", "<0x03>", "<0x04>"]


def _tokenizer():
    """A tiny BPE built as Fuyu's tokenizer.json is (SentencePiece style: ▁ prepended, spaces as ▁): |SPEAKER| (the
    image placeholder), |NEWLINE| and the byte pieces <0x00>..<0x04> the processor writes (boxes, points, <0x04> the
    beginning of the answer) are pieces of the vocabulary, so an image placeholder string tokenizes with a leading
    ▁, which FuyuProcessor drops ([..., 1:]); <unk> <s> </s> and |ENDOFTEXT| (bos and eos) are special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    vocab, merges = {"<unk>": 0, "<s>": 1, "</s>": 2}, []
    for w in WORDS + PIECES:                            # each piece merged left to right from its characters
        for k in range(1, len(w) + 1):
            vocab.setdefault(w[:k], len(vocab))
            vocab.setdefault(w[k - 1], len(vocab))
            if k > 1 and (w[:k - 1], w[k - 1]) not in merges:
                merges.append((w[:k - 1], w[k - 1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t in ("<unk>", "<s>", "</s>", "|ENDOFTEXT|")])
    return tok


def _tiny(tok, tie=False, seed=0):
    from transformers import FuyuConfig, FuyuForCausalLM
    torch.manual_seed(seed)
    cfg = FuyuConfig(patch_size=P, image_token_id=tok.token_to_id("|SPEAKER|"), tie_word_embeddings=tie,
                     text_config=dict(model_type="persimmon", vocab_size=tok.get_vocab_size(), hidden_size=32,
                                      intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                      max_position_embeddings=512, qk_layernorm=True, hidden_act="relu2",
                                      rope_parameters={"rope_type": "default", "rope_theta": 25000.0,
                                                       "partial_rotary_factor": 0.5}, tie_word_embeddings=tie))
    return away_from_init(FuyuForCausalLM(cfg).eval(), seed)    # LayerNorm gains and biases off their 1 / 0


def _processor(src):
    """transformers' FuyuProcessor over the saved tokenizer and FuyuImageProcessorPil (no torchvision here, whose
    FuyuImageProcessor is the default; the PIL one's patchify takes numpy, the processor hands it a tensor)."""
    from transformers import AutoTokenizer, FuyuImageProcessorPil, FuyuProcessor

    class ImageProcessor(FuyuImageProcessorPil):
        def patchify_image(self, image, patch_size=None):
            return torch.from_numpy(super().patchify_image(np.asarray(image), patch_size))
    ip = ImageProcessor(size=CANVAS, patch_size={"height": P, "width": P})
    return FuyuProcessor(image_processor=ip, tokenizer=AutoTokenizer.from_pretrained(src))


def _save(d, tie=False):
    """A tiny Fuyu saved as transformers saves it, with its tokenizer files and preprocessor_config.json (no chat
    template: the release has none); imported by `edgemm import`."""
    from click.testing import CliRunner
    from edgemm.cli import main
    tok = _tokenizer()
    hf = _tiny(tok, tie)
    src = d / "src"
    hf.save_pretrained(src, safe_serialization=True)
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "|ENDOFTEXT|", "eos_token": "|ENDOFTEXT|", "unk_token": "<unk>",
        "tokenizer_class": "PreTrainedTokenizerFast"}))
    proc = _processor(src)
    proc.image_processor.save_pretrained(src)
    r = CliRunner().invoke(main, ["import", str(src), "-o", str(d / "ck")])
    assert r.exit_code == 0, r.output
    return {"hf": hf, "proc": proc, "src": src, "ck": d / "ck", "dir": d, "import_log": r.output}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    return _save(tmp_path_factory.mktemp("fuyu"))


def _image(w, h, seed):
    from PIL import Image
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _reference(proc, img):
    """FuyuProcessor's ids and patches for the question about img."""
    return proc(images=img, text=QUESTION + "\n", return_tensors="pt", return_legacy_image_output=False)


def _logits(hf, hf_in):
    return lambda ids: hf(input_ids=torch.tensor([ids]), pixel_values=hf_in["pixel_values"]).logits[0]


def _segments(tok, template, rows):
    from edgemm.chat_template import normalize_messages, segments_template
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}},
                                         {"type": "text", "text": QUESTION}]}]
    return [(k, torch.tensor([x]) if k == "text" else rows) for k, x in
            segments_template(tok, template, normalize_messages(msgs))]


def test_import_reads_the_family(imported):
    cfg = json.loads((imported["ck"] / "config.json").read_text())
    v, d = cfg["vision"], cfg["decoder"]
    assert "as fuyu" in imported["import_log"]
    assert (v["arch"], v["tiling"], v["canvas"], v["patch_size"]) == ("patch_linear", "fuyu", [36, 48], P)
    assert (d["norm"], d["mlp"], d["rope_dims"], d["qk_norm"], d["linear_bias"]) == ("layer", "relu2", 8, True, True)
    assert cfg["tokens"]["add_bos"] is False and (imported["ck"] / "chat_template.jinja").read_text().endswith(
        "{% endif %}{% endfor %}")


@pytest.mark.parametrize("w,h", SIZES)
def test_import_matches_transformers(imported, w, h):
    """The host's pixels equal FuyuProcessor's patches, edgemm's prompt its ids (image rows at the |SPEAKER| and
    |NEWLINE| positions, then <s>, the question, <0x04>), and the logits and cached greedy steps transformers'
    within 1e-4."""
    from edgemm.tilings import image_rows
    from edgemm.checkpoint import load_checkpoint
    from runtimes.torch_backend import TorchBackend
    hf, proc = imported["hf"], imported["proc"]
    m, tok = load_checkpoint(imported["ck"])
    b = TorchBackend.open(model=str(imported["ck"]), device="cpu")
    img = _image(w, h, w * h)
    hf_in = _reference(proc, img)
    from edgemm.fuyu_patches import preprocess
    px = torch.from_numpy(preprocess(img, m.cfg.vision))
    patches = px.unflatten(3, (-1, P)).unflatten(2, (-1, P)).permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2)
    tol = 1e-6 if (w, h) != SIZES[-1] else 2.01 / 127.5          # (a downscale: PIL's rounding, one level or two)
    assert patches.shape[1:] == hf_in["pixel_values"].shape and (patches[0] - hf_in["pixel_values"]).abs().max() <= tol
    with torch.no_grad():
        rows = torch.from_numpy(np.asarray(image_rows(b, img), np.float32))
    segs = _segments(tok, (imported["ck"] / "chat_template.jinja").read_text(), rows)
    ids = hf_in["input_ids"][0].tolist()
    n = rows.shape[1]
    assert [k for k, _ in segs] == ["image", "text"] and n == m.cfg.image_rows_for(w, h)
    assert segs[1][1][0].tolist() == ids[n:] and ids[n] == tok.tok.token_to_id("<s>")
    sp, nl = (tok.tok.token_to_id(t) for t in ("|SPEAKER|", "|NEWLINE|"))
    cols = px.shape[3] // P
    assert ids[:n] == ([sp] * cols + [nl]) * (px.shape[2] // P)
    hf_in["pixel_values"] = patches[0]                         # the same pixels both sides (the downscale aside)
    logits_and_cached_steps_match(m, segs, ids, _logits(hf, hf_in))


def test_tied_embeddings(tmp_path):
    """tie_word_embeddings: the LM head is the token embedding."""
    d = _save(tmp_path, tie=True)
    from edgemm.checkpoint import load_checkpoint
    m, tok = load_checkpoint(d["ck"])
    assert m.decoder.lm_head.weight is m.decoder.tok_embeddings.weight
    img = _image(*SIZES[0], 3)
    hf_in = _reference(d["proc"], img)
    with torch.no_grad():
        ref = d["hf"](**{k: hf_in[k] for k in ("input_ids", "pixel_values")}).logits[0, -1]
        rows = m.encode_image(torch.from_numpy(__import__("edgemm.fuyu_patches").fuyu_patches.preprocess(
            img, m.cfg.vision)))
        n = rows.shape[1]
        got = m.forward_full([("image", rows), ("text", hf_in["input_ids"][:, n:])])[0, -1]
    assert (got - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("change,says", [
    (lambda hf, pc: hf["text_config"].update(hidden_act="gelu"), "hidden_act 'gelu'"),
    (lambda hf, pc: hf["text_config"]["rope_parameters"].update(partial_rotary_factor=0.1), "partial_rotary_factor"),
    (lambda hf, pc: hf.update(image_token_id=0), "image_token_id 0"),
    (lambda hf, pc: pc.update(patch_size={"height": 4, "width": 4}), "patch_size"),
    (lambda hf, pc: pc.update(size={"height": 40, "width": 48}), "whole 6 px patches"),
    (lambda hf, pc: pc.update(resample=3), "resample"),
])
def test_import_refuses_a_broken_checkpoint(imported, tmp_path, change, says):
    """A config or processor setting edgemm does not compute: exit 2, one line, nothing written."""
    import shutil
    from click.testing import CliRunner
    from edgemm.cli import main
    src = tmp_path / "src"
    shutil.copytree(imported["src"], src)
    hf, pc = (json.loads((src / n).read_text()) for n in ("config.json", "preprocessor_config.json"))
    change(hf, pc)
    (src / "config.json").write_text(json.dumps(hf))
    (src / "preprocessor_config.json").write_text(json.dumps(pc))
    r = CliRunner().invoke(main, ["import", str(src), "-o", str(tmp_path / "ck")])
    assert r.exit_code == 2 and says in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not (tmp_path / "ck").exists()


def test_import_refuses_a_tokenizer_without_the_image_tokens(imported, tmp_path):
    import shutil
    from click.testing import CliRunner
    from edgemm.cli import main
    src = tmp_path / "src"
    shutil.copytree(imported["src"], src)
    tj = json.loads((src / "tokenizer.json").read_text())
    del tj["model"]["vocab"]["|NEWLINE|"]
    (src / "tokenizer.json").write_text(json.dumps(tj))
    r = CliRunner().invoke(main, ["import", str(src), "-o", str(tmp_path / "ck")])
    assert r.exit_code == 2 and "|NEWLINE|" in r.output and len(r.output.strip().splitlines()) == 1, r.output


def test_exports_validate_and_answer(imported, monkeypatch):
    """`edgemm export --target onnx` (fp32, int8) and `--target trt --no-build` validate against the reference
    (ONNX Runtime runs the graphs: a vision stage over any image size, the Persimmon decoder); `edgemm run --image`
    on the onnx fp32 and trt bundles and `edgemm serve` of the onnx one answer transformers' greedy ids (the served
    prompt counted as the processor's ids); gguf is refused (llama.cpp has no Fuyu graph), naming onnx and trt."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    d, ck, hf, proc = imported["dir"], imported["ck"], imported["hf"], imported["proc"]
    exports_validate(ck, d, "llama.cpp has no Fuyu graph")
    from edgemm.tilings import image_rows
    from runtimes import load_backend
    ort_b = load_backend("ort", bundle=str(d / "onnx-fp32"), device="cpu")
    torch_b = load_backend("torch", model=str(ck))
    for i, (w, h) in enumerate(SIZES):                  # the vision graph at every image size: ONNX Runtime's rows
        got, ref = (np.asarray(image_rows(b, _image(w, h, i))) for b in (ort_b, torch_b))
        assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-5
    w, h = SIZES[0]
    _image(w, h, 7).save(d / "img.png")
    from PIL import Image
    hf_in = _reference(proc, Image.open(d / "img.png"))
    eos = set(json.loads((ck / "config.json").read_text())["tokens"]["eos"])
    want = greedy_ids(_logits(hf, hf_in), hf_in["input_ids"][0].tolist(), eos)
    bundles_answer(monkeypatch, d, d / "img.png", QUESTION, want)
    from .test_smolvlm import _served_answer
    _served_answer(d / "onnx-fp32", d / "img.png", len(hf_in["input_ids"][0]), want,
                   json.loads((ck / "config.json").read_text())["tokens"], QUESTION)


def test_trt_qdq_graphs_validate(imported, tmp_path):
    """`--target trt` int8 (Q/DQ graphs in standard ops, engines not built here: no GPU / TensorRT): every stage
    passes the exporter's checks against the reference (the any-size vision stage, LayerNormalization, partial RoPE
    and the squared-ReLU MLP quantized), and the vision profile spans one patch to the whole canvas."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install edgemm[cpu])")
    from edgemm.export.trt import export_trt
    man = export_trt(str(imported["ck"]), tmp_path / "trt", precision="int8", no_build=True, log=None)
    assert all(s["ok"] for s in man["validation"]["stages"].values()), man["validation"]
    from edgemm.config import ModelConfig
    from edgemm.export.trt_profiles import make_profiles
    px = make_profiles(ModelConfig.from_dict(man["model"]), "workstation")["vision"]["pixels"]
    assert px["min"] == [1, 3, P, P] and px["max"] == [1, 3, CANVAS["height"], CANVAS["width"]]


def test_release_flat_config(imported, tmp_path):
    """adept/fuyu-8b's config.json is flat (the Persimmon keys at its top level, as FuyuConfig pops them): the same
    edgemm config and weights as transformers 5's nested text_config."""
    import shutil
    from click.testing import CliRunner
    from edgemm.cli import main
    src = tmp_path / "src"
    shutil.copytree(imported["src"], src)
    hf = json.loads((src / "config.json").read_text())
    tc = hf.pop("text_config")
    rp = tc.pop("rope_parameters")
    hf.update({k: v for k, v in tc.items() if k not in ("model_type", "dtype")}, rope_theta=rp["rope_theta"],
              partial_rotary_factor=rp["partial_rotary_factor"])
    (src / "config.json").write_text(json.dumps(hf))
    from transformers import FuyuConfig
    t = FuyuConfig.from_pretrained(src).text_config             # (transformers reads the flat form the same way)
    assert (t.hidden_size, t.num_hidden_layers, t.rope_parameters["partial_rotary_factor"]) == (32, 2, 0.5)
    r = CliRunner().invoke(main, ["import", str(src), "-o", str(tmp_path / "ck")])
    assert r.exit_code == 0, r.output
    want, got = (json.loads((d / "config.json").read_text()) for d in (imported["ck"], tmp_path / "ck"))
    assert {**got, "name": want["name"]} == want


def test_a_sliver_of_an_image_is_one_patch_wide(imported):
    """A 1 x 400 px image downscaled to the canvas is 0 px wide by the processor's int(): edgemm keeps one pixel,
    one patch per row (rows of 1 patch + the newline row), and the vision stage encodes it."""
    from edgemm.checkpoint import load_checkpoint
    from edgemm.fuyu_patches import preprocess
    m, _ = load_checkpoint(imported["ck"])
    px = preprocess(_image(1, 400, 0), m.cfg.vision)
    assert px.shape == (1, 3, CANVAS["height"], P) and m.cfg.image_rows_for(1, 400) == CANVAS["height"] // P * 2
    with torch.no_grad():
        assert m.encode_image(torch.from_numpy(px)).shape == (1, CANVAS["height"] // P * 2, 32)
