"""Hostile files: crafted GGUF headers, ONNX external data that points out of the bundle, tampered manifests, and a
hypothesis fuzz suite over the pure-Python parsers (only edgemm's own error escapes, in bounded time)."""
from __future__ import annotations

import json
import struct
import time

import numpy as np
import pytest
from click.testing import CliRunner

from edgemm.errors import EdgemmError

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install hypothesis)")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402


def _gguf(path, tokens=("a", "b", "c"), tensor=(64, 2)):
    """A small valid GGUF written with gguf-py."""
    import gguf
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list(list(tokens))
    w.add_token_scores([0.0] * len(tokens))
    w.add_tensor("t.weight", np.zeros(tensor, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _header(n_tensors, n_kv, body=b""):
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + body


# --------------------------------------------------------------------------- GGUF pre-check
def test_valid_gguf_passes(tmp_path):
    from edgemm.safety import check_gguf
    r = check_gguf(_gguf(tmp_path / "ok.gguf"))
    assert r["tensors"] == 1 and r["alignment"] == 32


def test_huge_tensor_count_refused_fast_and_small(tmp_path):
    import tracemalloc
    from edgemm.safety import check_gguf
    p = tmp_path / "evil.gguf"
    p.write_bytes(_header(2**40, 0))
    tracemalloc.start()
    t = time.perf_counter()
    with pytest.raises(EdgemmError, match="claims 1099511627776 tensors"):
        check_gguf(p)
    dt, (_, peak) = time.perf_counter() - t, tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert dt < 1.0 and peak < 50 * 2**20


@pytest.mark.parametrize("case,match", [
    ("magic", "bad magic"), ("version", "version 7"), ("kv count", "metadata keys"),
    ("string length", "claims 1152921504606846976 bytes"), ("array length", "claims 1099511627776 items"),
    ("string array past end", "runs past the end"), ("unknown type", "unknown value type"),
    ("truncated data", "outside the file"), ("tokens not strings", "tokenizer.ggml.tokens must be"),
    ("scores length", "items for 3 tokens"), ("alignment", "general.alignment"), ("dims", "dimensions")])
def test_crafted_gguf_headers(tmp_path, case, match):
    from edgemm.safety import check_gguf
    p = tmp_path / "x.gguf"
    key = lambda k: struct.pack("<Q", len(k)) + k                                     # noqa: E731
    if case == "magic":
        p.write_bytes(b"GGUX" + b"\0" * 20)
    elif case == "version":
        p.write_bytes(b"GGUF" + struct.pack("<IQQ", 7, 0, 0))
    elif case == "kv count":
        p.write_bytes(_header(0, 2**30))
    elif case == "string length":
        p.write_bytes(_header(0, 1, struct.pack("<Q", 2**60)))
    elif case == "array length":
        p.write_bytes(_header(0, 1, key(b"k") + struct.pack("<IIQ", 9, 4, 2**40)))
    elif case == "string array past end":
        p.write_bytes(_header(0, 1, key(b"k") + struct.pack("<IIQ", 9, 8, 2**20)))
    elif case == "unknown type":
        p.write_bytes(_header(0, 1, key(b"k") + struct.pack("<I", 99)))
    elif case == "truncated data":
        good = _gguf(tmp_path / "g.gguf").read_bytes()
        p.write_bytes(good[:-100])
    elif case == "tokens not strings":
        p.write_bytes(_header(0, 1, key(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 4, 1) + b"\0" * 4))
    elif case == "scores length":
        _gguf(p)
        b = bytearray(p.read_bytes())
        i = b.find(b"tokenizer.ggml.scores") + len(b"tokenizer.ggml.scores")
        struct.pack_into("<Q", b, i + 8, 2)               # (type, item type) then the count: 3 -> 2 scores
        p.write_bytes(bytes(b[:i + 16]) + bytes(b[i + 16 + 4:]))   # and drop one float so the rest still parses
    elif case == "alignment":
        p.write_bytes(_header(0, 1, key(b"general.alignment") + struct.pack("<II", 4, 48)))
    elif case == "dims":
        p.write_bytes(_header(1, 0, key(b"t") + struct.pack("<I", 9)))
    with pytest.raises(EdgemmError, match=match):
        check_gguf(p)


def test_llama_cpp_never_sees_a_refused_gguf(tmp_path, monkeypatch):
    """The backend's runner checks the header first; llama.cpp's loader is not called for a refused file."""
    import edgemm.runtimes.llamacpp_backend as LB
    calls = []
    monkeypatch.setattr(LB, "load_llama_cpp", lambda *a, **k: calls.append(1))
    p = tmp_path / "evil.gguf"
    p.write_bytes(_header(2**40, 0))
    with pytest.raises(EdgemmError, match="tensors"):
        LB.LlamaRunner(p, 64)
    assert calls == []


def test_cli_refuses_a_bundle_with_a_crafted_decoder(tmp_path):
    """A gguf bundle whose decoder was swapped for a crafted file (manifest rehashed, as an attacker would): one
    error line, exit code 2."""
    from edgemm.bundle import FORMAT, FORMAT_VERSION, write_manifest
    from edgemm.cli import main
    from edgemm.config import get_preset
    b = tmp_path / "b"
    b.mkdir()
    (b / "decoder.gguf").write_bytes(_header(2**40, 0))
    _gguf(b / "mmproj.gguf")
    from tests.conftest import make_tokenizer
    make_tokenizer().save(b / "tokenizer.json")
    write_manifest(b, {"target": "gguf", "model": get_preset("tiny-shapes").to_dict(), "tokenizer": "tokenizer.json",
                       "stages": {"decoder": {"file": "decoder.gguf"}, "vision": {"file": "mmproj.gguf"}}})
    assert json.loads((b / "edgemm.json").read_text())["format"] == FORMAT and FORMAT_VERSION
    r = CliRunner().invoke(main, ["run", "--bundle", str(b), "--backend", "llamacpp", "hi"])
    assert r.exit_code == 2 and "error:" in r.output and "tensors" in r.output and "Traceback" not in r.output


# --------------------------------------------------------------------------- ONNX external data
def _onnx_with_external(path, location):
    import onnx
    from onnx import TensorProto, helper
    w = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[2, 2])
    w.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "16")):
        e = w.external_data.add()
        e.key, e.value = k, v
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    onnx.save_model(helper.make_model(g), str(path))


@pytest.mark.parametrize("loc,match", [("../outside.bin", "outside the bundle"), ("/etc/passwd", "outside the bundle"),
                                       ("link.bin", "leads outside|symbolic link"), ("hard.bin", "hard link")])
def test_onnx_external_data_must_stay_inside(tmp_path, loc, match):
    import os
    from edgemm.safety import check_onnx_external
    b = tmp_path / "bundle"
    b.mkdir()
    (tmp_path / "outside.bin").write_bytes(b"\0" * 16)
    os.symlink(tmp_path / "outside.bin", b / "link.bin")
    os.link(tmp_path / "outside.bin", b / "hard.bin")
    _onnx_with_external(b / "stage.onnx", loc)
    with pytest.raises(EdgemmError, match=match):
        check_onnx_external(b / "stage.onnx", b)
    (b / "ok.bin").write_bytes(b"\0" * 16)
    _onnx_with_external(b / "ok.onnx", "ok.bin")
    check_onnx_external(b / "ok.onnx", b)                     # inside: fine


# --------------------------------------------------------------------------- manifests
def _bundle(tmp_path):
    from edgemm.bundle import write_manifest
    b = tmp_path / "m"
    b.mkdir()
    (b / "decoder.gguf").write_bytes(b"x")
    (b / "mmproj.gguf").write_bytes(b"y")
    write_manifest(b, {"target": "gguf", "stages": {"decoder": {"file": "decoder.gguf"},
                                                    "vision": {"file": "mmproj.gguf"}}})
    return b


@pytest.mark.parametrize("case,match", [("duplicate key", "appears twice"), ("digest", "not 64 hex"),
                                        ("unlisted", "not in its manifest"), ("symlink", "symbolic link|outside the bundle"),
                                        ("dotdot", "outside the bundle"), ("files type", "'files' must map")])
def test_tampered_manifests(tmp_path, case, match):
    import os
    from edgemm.bundle import MANIFEST, verify_bundle
    b = _bundle(tmp_path)
    m = json.loads((b / MANIFEST).read_text())
    if case == "duplicate key":
        text = (b / MANIFEST).read_text().replace('"target": "gguf"', '"target": "gguf", "target": "onnx"')
        (b / MANIFEST).write_text(text)
    else:
        if case == "digest":
            m["files"]["decoder.gguf"] = "zz" * 32
        elif case == "unlisted":
            (b / "evil.so").write_bytes(b"\x7fELF")
        elif case == "symlink":
            (tmp_path / "elsewhere").write_bytes(b"x")
            os.remove(b / "decoder.gguf")
            os.symlink(tmp_path / "elsewhere", b / "decoder.gguf")
        elif case == "dotdot":
            m["files"]["../elsewhere"] = "0" * 64
        elif case == "files type":
            m["files"] = ["decoder.gguf"]
        (b / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(EdgemmError, match=match):
        verify_bundle(b)


# --------------------------------------------------------------------------- fuzzing
FUZZ = settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


@pytest.fixture(scope="module")
def good_gguf(tmp_path_factory):
    return _gguf(tmp_path_factory.mktemp("fz") / "good.gguf").read_bytes()


@FUZZ
@given(data=st.data())
def test_fuzz_gguf_precheck(tmp_path_factory, good_gguf, data):
    """Byte flips, truncations and random headers: check_gguf passes or raises EdgemmError, quickly."""
    from edgemm.safety import check_gguf
    b = bytearray(good_gguf)
    for _ in range(data.draw(st.integers(0, 8))):
        i = data.draw(st.integers(0, len(b) - 1))
        b[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(b)))
    blob = bytes(b[:cut]) if data.draw(st.booleans()) else data.draw(st.binary(max_size=256))
    p = tmp_path_factory.mktemp("f") / "x.gguf"
    p.write_bytes(blob)
    t = time.perf_counter()
    try:
        check_gguf(p)
    except EdgemmError:
        pass
    assert time.perf_counter() - t < 1.0


@FUZZ
@given(blob=st.one_of(st.binary(max_size=512), st.text(max_size=512).map(str.encode),
                      st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                                   lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                                   max_leaves=20).map(lambda v: json.dumps(v).encode())))
def test_fuzz_manifest(tmp_path_factory, blob):
    from edgemm.bundle import MANIFEST, read_manifest, verify_bundle
    d = tmp_path_factory.mktemp("m")
    (d / MANIFEST).write_bytes(blob)
    try:
        verify_bundle(d)
    except EdgemmError:
        pass
    try:
        read_manifest(d)
    except EdgemmError:
        pass


@FUZZ
@given(lines=st.lists(st.one_of(st.text(max_size=80), st.binary(max_size=80).map(lambda b: b.decode("latin-1")),
                                st.dictionaries(st.sampled_from(["image", "prompt", "question", "answer"]),
                                                st.one_of(st.text(max_size=20), st.integers(), st.none()),
                                                max_size=4).map(json.dumps)), max_size=6))
def test_fuzz_calibration_prompts(tmp_path_factory, lines):
    from PIL import Image
    from edgemm.calib.sets import load_calib_dir
    d = tmp_path_factory.mktemp("c")
    Image.new("RGB", (4, 4)).save(d / "a.png")
    (d / "prompts.jsonl").write_text("\n".join(lines), encoding="utf-8", errors="surrogateescape")
    try:
        load_calib_dir(d)
    except EdgemmError:
        pass


# --------------------------------------------------------------------------- calibration folders, indexes, images
@pytest.mark.parametrize("image,match", [("../a.png", "must be a path inside"), ("/etc/passwd", "must be a path inside"),
                                        ("file:///etc/passwd", "must be a path inside"),
                                        ("link.png", "leads outside")])
def test_calibration_images_stay_in_the_folder(tmp_path, image, match):
    import os
    from PIL import Image
    from edgemm.calib.sets import load_calib_dir
    d = tmp_path / "calib"
    d.mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    os.symlink(tmp_path / "a.png", d / "link.png")
    (d / "prompts.jsonl").write_text(json.dumps({"image": image, "prompt": "q"}) + "\n")
    with pytest.raises(EdgemmError, match=match):
        load_calib_dir(d)


def test_calibration_lines_invalid_utf8_deep_nesting_and_length(tmp_path):
    from edgemm.calib.sets import load_calib_dir
    d = tmp_path / "c"
    d.mkdir()
    (d / "prompts.jsonl").write_bytes(b'{"image": "a.png", "prompt": "q"}\n{"prompt": "\xff\xfe"}\n')
    with pytest.raises(EdgemmError, match="prompts.jsonl:2: not valid UTF-8"):
        load_calib_dir(d)
    (d / "prompts.jsonl").write_text("[" * 100000 + "]" * 100000 + "\n")
    with pytest.raises(EdgemmError, match="prompts.jsonl:1: (the line is|JSON nested)"):
        load_calib_dir(d)


@pytest.mark.parametrize("shard", ["../x.safetensors", "/abs/x.safetensors", "sub/x.safetensors"])
def test_shard_index_names_must_be_plain_files(tmp_path, shard):
    from edgemm.checkpoint import checkpoint_digest
    from edgemm.importers.shards import Source
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    with pytest.raises(EdgemmError, match="not a plain file name"):
        checkpoint_digest(tmp_path)
    with pytest.raises(EdgemmError, match="not a plain file name"):
        Source(tmp_path)


def test_only_allowed_image_formats_are_decoded(tmp_path):
    from PIL import Image
    from edgemm.processor import load_image
    Image.new("RGB", (8, 8)).save(tmp_path / "x.pdf")                   # Pillow writes PDF; we never read it
    with pytest.raises(EdgemmError, match="not an image file"):
        load_image(tmp_path / "x.pdf")
    frames = [Image.new("RGB", (6, 3), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    img = load_image(tmp_path / "anim.gif")                             # multi-frame: the first frame
    assert img.size == (6, 3) and img.getpixel((0, 0))[0] > 200
    Image.new("RGB", (1, 500)).save(tmp_path / "thin.png")
    assert load_image(tmp_path / "thin.png").size == (1, 500)            # odd geometry: an image


# --------------------------------------------------------------------------- safetensors headers
def _st(path, header: dict, data: bytes):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


@pytest.mark.parametrize("case,match", [
    ("ok", None), ("header length", "the header claims"), ("duplicate", "names a tensor twice"),
    ("span", "need 16"), ("overlap", "overlaps"), ("gap", "leaves a gap"), ("tail", "not any tensor's"),
    ("dtype", "malformed"), ("shape", "bad shape"), ("not json", "not valid JSON")])
def test_crafted_safetensors_headers(tmp_path, case, match):
    from edgemm.safety import check_safetensors
    p = tmp_path / "m.safetensors"
    a = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
    b = {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]}
    if case == "ok":
        _st(p, {"a": a, "b": b, "__metadata__": {"format": "pt"}}, b"\0" * 24)
        assert check_safetensors(p) == 2
        return
    if case == "header length":
        p.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    elif case == "duplicate":
        h = b'{"a": %s, "a": %s}' % (json.dumps(a).encode(), json.dumps(a).encode())
        p.write_bytes(struct.pack("<Q", len(h)) + h + b"\0" * 16)
    elif case == "span":
        _st(p, {"a": dict(a, data_offsets=[0, 12])}, b"\0" * 12)
    elif case == "overlap":
        _st(p, {"a": a, "b": dict(b, data_offsets=[8, 16])}, b"\0" * 16)
    elif case == "gap":
        _st(p, {"a": a, "b": dict(b, data_offsets=[20, 28])}, b"\0" * 28)
    elif case == "tail":
        _st(p, {"a": a}, b"\0" * 40)
    elif case == "dtype":
        _st(p, {"a": dict(a, dtype="F128")}, b"\0" * 16)
    elif case == "shape":
        _st(p, {"a": dict(a, shape=[-2, -2])}, b"\0" * 16)
    elif case == "not json":
        p.write_bytes(struct.pack("<Q", 4) + b"{no}")
    with pytest.raises(EdgemmError, match=match):
        check_safetensors(p)


def test_load_checkpoint_refuses_a_crafted_safetensors(tmp_path, random_ckpt):
    import shutil
    from edgemm.checkpoint import load_checkpoint
    d = tmp_path / "ck"
    shutil.copytree(random_ckpt, d)
    raw = bytearray((d / "model.safetensors").read_bytes())
    (d / "model.safetensors").write_bytes(bytes(raw[:len(raw) // 2]))        # truncated: spans leave the file
    with pytest.raises(EdgemmError, match="spans bytes|the header claims"):
        load_checkpoint(d)


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors_header(tmp_path_factory, data):
    from edgemm.safety import check_safetensors
    p = tmp_path_factory.mktemp("s") / "x.safetensors"
    h = json.dumps({"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    good = bytearray(struct.pack("<Q", len(h)) + h + b"\0" * 16)
    for _ in range(data.draw(st.integers(0, 6))):
        good[data.draw(st.integers(0, len(good) - 1))] = data.draw(st.integers(0, 255))
    p.write_bytes(bytes(good[:data.draw(st.integers(0, len(good)))]))
    try:
        check_safetensors(p)
    except EdgemmError:
        pass


# --------------------------------------------------------------------------- what is parsed is what was hashed
@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory, random_ckpt):
    from edgemm.export.onnx import export_onnx
    out = tmp_path_factory.mktemp("swap") / "b"
    export_onnx(model=str(random_ckpt), out=out, precision="fp32", threads=2, log=None)
    return out


def test_a_graph_swapped_after_the_check_is_refused(onnx_bundle, tmp_path, monkeypatch):
    """A stage file replaced between the manifest check and the parse (a check-then-swap race, simulated by
    swapping right after verify_bundle returns) is refused: the backend hashes the bytes it hands to ONNX Runtime."""
    import shutil
    import edgemm.bundle as B
    from edgemm.runtimes.ort_backend import OrtBackend
    b = tmp_path / "b"
    shutil.copytree(onnx_bundle, b)
    OrtBackend.open(bundle=str(b), threads=1)                      # intact: opens
    real = B.verify_bundle

    def verify_then_swap(*a, **kw):
        m = real(*a, **kw)
        (b / "decoder_text.onnx").write_bytes((b / "decoder_image.onnx").read_bytes())   # a valid, other graph
        return m
    monkeypatch.setattr(B, "verify_bundle", verify_then_swap)
    with pytest.raises(EdgemmError, match="decoder_text.onnx does not match its sha256"):
        OrtBackend.open(bundle=str(b), threads=1)


def test_trt_bundles_naming_plugin_libraries_are_refused(tmp_path):
    from edgemm.bundle import write_manifest
    from edgemm.runtimes.trt_backend import _open_bundle
    b = tmp_path / "t"
    b.mkdir()
    (b / "libevil.so").write_bytes(b"\x7fELF")
    for s in ("decoder_text", "decoder_image"):
        (b / f"{s}.onnx").write_bytes(b"")
    write_manifest(b, {"target": "trt", "stages": {s: {"file": f"{s}.onnx"} for s in ("decoder_text", "decoder_image")},
                       "trt": {"plugins": ["libevil.so"]}})
    with pytest.raises(EdgemmError, match="plugin libraries"):
        _open_bundle(b, verify=False)


def test_a_pinned_gguf_is_the_file_that_was_hashed(tmp_path):
    """The llamacpp backend hashes each GGUF through a descriptor and hands llama.cpp that descriptor's name:
    a file swapped in before the hash is refused; one swapped in after it is never read."""
    import os
    from edgemm.bundle import PinnedFile, write_manifest
    from edgemm.safety import check_gguf
    b = tmp_path / "b"
    b.mkdir()
    _gguf(b / "decoder.gguf")
    _gguf(b / "mmproj.gguf")
    m = write_manifest(b, {"target": "gguf", "stages": {"decoder": {"file": "decoder.gguf"},
                                                        "vision": {"file": "mmproj.gguf"}}})
    pin = PinnedFile(b, "decoder.gguf", m)
    (tmp_path / "evil.gguf").write_bytes(_header(2**40, 0))
    os.replace(tmp_path / "evil.gguf", b / "decoder.gguf")           # after the hash: the pinned name still reads
    assert check_gguf(pin.path)["tensors"] == 1                      # the original file
    with pytest.raises(EdgemmError, match="tensors"):
        check_gguf(b / "decoder.gguf")
    pin.close()
    with pytest.raises(EdgemmError, match="does not match its sha256"):  # before the hash: refused
        PinnedFile(b, "decoder.gguf", m)
