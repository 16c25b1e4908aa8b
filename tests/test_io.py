"""Tokenizer, checkpoint format, image processor and its errors, the shapes task."""
import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from edgemm import shapes
from edgemm.checkpoint import load_checkpoint, save_checkpoint
from edgemm.config import get_preset
from edgemm.errors import EdgemmError
from edgemm.processor import load_image, preprocess


# ---------------------------------------------------------------- tokenizer
def test_tokenizer_roundtrip_and_vocab(tokenizer):
    assert tokenizer.vocab_size == get_preset("tiny-shapes").decoder.vocab_size
    for text in ["Q: What color is the circle?\nA:", " bottom right", "unseen words, émoji ✓"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    # every answer of the task is a short token sequence
    for a in shapes.POSITIONS + tuple(shapes.COLORS) + shapes.SHAPES:
        assert len(tokenizer.answer(a)) <= 3


def test_chat_template_renders_the_prompt_pieces(tokenizer):
    jinja2 = pytest.importorskip("jinja2")
    from edgemm.tokenizer import ANSWER_FMT, BOS, CHAT_TEMPLATE, EOS, IMAGE, TURN_SEP, USER_FMT
    msgs = [{"role": "user", "content": "What color is the circle?", "image": True},
            {"role": "assistant", "content": "red"}, {"role": "user", "content": "Where is it?"}]
    text = jinja2.Template(CHAT_TEMPLATE).render(messages=msgs, bos_token=BOS, eos_token=EOS)
    pieces = (BOS + IMAGE + USER_FMT.format(question="What color is the circle?") + ANSWER_FMT.format(answer="red")
              + EOS + TURN_SEP + USER_FMT.format(question="Where is it?"))
    assert text == pieces


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_roundtrip(random_ckpt, tmp_path):
    import torch
    m, tok = load_checkpoint(random_ckpt)
    out = save_checkpoint(m, tok, tmp_path / "copy")
    m2, _ = load_checkpoint(out)
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    assert sorted(p.name for p in out.iterdir()) == ["chat_template.jinja", "config.json", "model.safetensors",
                                                     "tokenizer.json"]


def test_fp16_storage_loads_in_fp32(random_ckpt, tmp_path):
    import torch
    from safetensors import safe_open
    m, tok = load_checkpoint(random_ckpt)
    save_checkpoint(m, tok, tmp_path / "h", dtype=torch.float16)
    with safe_open(str(tmp_path / "h" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    m2, _ = load_checkpoint(tmp_path / "h")
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()):
        assert b.dtype == torch.float32, k
        assert torch.equal(b, a.half().float()), k
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "h") < 0.51 * size(random_ckpt)


def test_corrupt_checkpoint_is_a_clear_error(random_ckpt, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(random_ckpt, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(EdgemmError, match="corrupt"):
        load_checkpoint(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(EdgemmError, match="model.safetensors is missing"):
        load_checkpoint(bad)


def test_config_mismatch_names_the_tensor(random_ckpt, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(random_ckpt, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["decoder"]["ffn_dim"] = 768
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgemmError, match="has shape .* config.json expects"):
        load_checkpoint(bad)


# ---------------------------------------------------------------- images
def _png_bytes(img):
    b = io.BytesIO()
    img.save(b, "PNG")
    return b.getvalue()


def test_image_modes_all_become_the_same_rgb_input(tmp_path):
    vc = get_preset("tiny-shapes").vision
    rgb = Image.fromarray(shapes.render(shapes.scene_at("test", 0)))
    ref = preprocess(rgb, vc)
    assert ref.shape == (1, 3, 48, 48) and ref.dtype == np.float32
    rgba = rgb.convert("RGBA")
    assert np.abs(preprocess(rgba, vc) - ref).max() < 1e-6        # opaque alpha changes nothing
    assert np.abs(preprocess(rgb.convert("P"), vc) - ref).mean() < 0.1   # palette quantisation only
    grey = rgb.convert("L")
    g16 = Image.fromarray(np.asarray(grey).astype(np.uint16) * 257)
    assert np.abs(preprocess(g16, vc) - preprocess(grey, vc)).max() < 1e-2
    big = rgb.resize((301, 177))                                  # any size and aspect
    assert preprocess(big, vc).shape == (1, 3, 48, 48)


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((20, 40, 3), np.uint8)
    a[:, :20] = 255                                   # left half white
    img = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6                                  # rotate 90 CW on display
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif.tobytes(), quality=95)
    out = load_image(p)
    assert out.size == (20, 40)                       # width/height swapped
    arr = np.asarray(out)
    assert arr[:20].mean() > 200 and arr[20:].mean() < 50  # the white half is now on top


def _bomb_png(w, h):
    """A valid-looking PNG header claiming w x h pixels (no memory needed)."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("case,match", [("missing", "not found"), ("text", "not an image"),
                                        ("truncated", "damaged or truncated"), ("bomb", "decompression bomb"),
                                        ("dir", "directory")])
def test_bad_images_are_clear_errors(tmp_path, case, match):
    p = tmp_path / "x.png"
    if case == "text":
        p.write_text("hello, not an image")
    elif case == "truncated":
        p.write_bytes(_png_bytes(Image.fromarray(shapes.render(shapes.scene_at("test", 1))))[:200])
    elif case == "bomb":
        p.write_bytes(_bomb_png(30000, 30000))
    elif case == "dir":
        p.mkdir()
    with pytest.raises(EdgemmError, match=match):
        load_image(p)


# ---------------------------------------------------------------- shapes task
def test_splits_are_disjoint_and_deterministic():
    train = {shapes.scene_at("train", i).signature() for i in range(3000)}
    test = [shapes.scene_at("test", i).signature() for i in range(1000)]
    assert not train & set(test)
    assert test == [shapes.scene_at("test", i).signature() for i in range(1000)]
    a, b = shapes.make_split("test", 8), shapes.make_split("test", 8)
    assert all(np.array_equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))


def test_questions_are_answerable_from_the_scene():
    rng = np.random.default_rng(0)
    for i in range(300):
        s = shapes.scene_at("val", i)
        for t in shapes.QTYPES:
            q = shapes.ask(s, t, rng)
            if q.qtype == "color":
                shape = q.question.split()[-1].rstrip("?")
                assert [o.color for o in s.objects if o.shape == shape] == [q.answer]
            elif q.qtype == "position":
                color = q.question.split()[3]
                assert shapes.POSITIONS[[o for o in s.objects if o.color == color][0].cell] == q.answer
