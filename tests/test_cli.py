"""The CLI: answers, chat commands, eval output, and one-line errors with exit code 2 for user mistakes."""
import json

import pytest
from click.testing import CliRunner
from PIL import Image

from edgemm import shapes
from edgemm.cli import main
from tests.conftest import requires_demo
from tests.test_io import _bomb_png


def _run(*args, input=None):
    r = CliRunner().invoke(main, list(args), input=input)
    return r.exit_code, r.output, r


@pytest.fixture(scope="module")
def example_png(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(shapes.render(shapes.scene_at("test", 3))).save(p)
    return p


def _bad(tmp_path, case):
    p = tmp_path / "bad.png"
    if case == "missing":
        return tmp_path / "nope.png"
    if case == "not-image":
        p.write_text("just text")
    elif case == "truncated":
        Image.fromarray(shapes.render(shapes.scene_at("test", 0))).save(p)
        p.write_bytes(p.read_bytes()[:150])
    elif case == "bomb":
        p.write_bytes(_bomb_png(30000, 30000))
    return p


@pytest.mark.parametrize("case", ["missing", "not-image", "truncated", "bomb"])
def test_bad_image_is_one_line_exit_2(random_ckpt, tmp_path, case):
    code, out, _ = _run("run", "--model", str(random_ckpt), "--image", str(_bad(tmp_path, case)), "What color?")
    assert code == 2
    assert "Traceback" not in out
    errs = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1


def test_empty_and_overlong_prompts_exit_2(random_ckpt, example_png):
    code, out, _ = _run("run", "--model", str(random_ckpt), "--image", str(example_png), "  ")
    assert code == 2 and "empty" in out and "Traceback" not in out
    code, out, _ = _run("run", "--model", str(random_ckpt), "--image", str(example_png), "why " * 700)
    assert code == 2 and "context holds" in out and "Traceback" not in out


def test_model_and_bundle_together_and_unknown_model(random_ckpt, tmp_path):
    code, out, _ = _run("run", "--model", str(random_ckpt), "--bundle", str(tmp_path), "hi")
    assert code == 2 and "not both" in out
    code, out, _ = _run("run", "--model", "no-such-model", "hi")
    assert code == 2 and "neither a checkpoint directory nor a preset" in out
    code, out, _ = _run("info", "--model", "cogvlm-17b")
    assert code == 0 and "17.64B" in out


def test_run_streams_an_answer(random_ckpt, example_png):
    code, out, r = _run("run", "--model", str(random_ckpt), "--image", str(example_png), "--max-new-tokens", "3",
                        "What color is the circle?")
    assert code == 0, r.output
    assert out.strip().splitlines()[-1].strip() != ""


def test_chat_commands(random_ckpt, example_png, tmp_path):
    lines = ["What color is the circle?", f"/image {example_png}", "Where is the red square?", "/reset",
             "/image /no/such.png", "/bogus", "How many shapes are there?", "/quit"]
    code, out, r = _run("chat", "--model", str(random_ckpt), "--max-new-tokens", "3", input="\n".join(lines) + "\n")
    assert code == 0, r.output
    assert "image not found" in out                     # a bad turn is reported, the chat goes on
    assert "unknown command /bogus" in out
    assert "conversation reset" in out


def test_eval_prints_per_type_table_and_json(random_ckpt, tmp_path):
    j = tmp_path / "r.json"
    code, out, r = _run("eval", "--model", str(random_ckpt), "--limit", "8", "--json", str(j))
    assert code == 0, r.output
    last = out.strip().splitlines()[-1]
    assert last.startswith("accuracy: ") and last.endswith("/8)")
    data = json.loads(j.read_text())
    assert data["total"] == 8 and set(data["per_type"]) <= set(shapes.QTYPES)
    assert sum(t["total"] for t in data["per_type"].values()) == 8
    assert data["correct"] == sum(p["correct"] for p in data["predictions"])


def test_eval_data_jsonl_errors(random_ckpt, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"image": "a.png", "question": "q"}\n')
    code, out, _ = _run("eval", "--model", str(random_ckpt), "--data", str(f))
    assert code == 2 and "d.jsonl:1" in out


@requires_demo
def test_readme_example_is_answered_correctly():
    """The README's command, on the shipped model: the answer must be the circle's colour in the scene."""
    from pathlib import Path
    import numpy as np
    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text()
    assert 'edgemm run --image examples/shapes.png "What color is the circle?"' in readme
    meta = json.loads((root / "examples" / "shapes.json").read_text())
    scene = shapes.scene_at(meta["split"], meta["index"])
    img = root / "examples" / "shapes.png"
    assert np.array_equal(np.asarray(Image.open(img).convert("RGB")), shapes.render(scene))
    truth = [o.color for o in scene.objects if o.shape == "circle"]
    assert len(truth) == 1
    code, out, r = _run("run", "--image", str(img), "What color is the circle?")
    assert code == 0, r.output
    assert out.strip().splitlines()[-1].strip() == truth[0]


@pytest.mark.parametrize("args, says", [
    (["--target", "gguf", "--max-context", "128"], "--max-context applies to --target trt"),
    (["--target", "onnx", "--profile", "orin"], "--profile applies to --target trt"),
    (["--target", "trt", "--recipe", "int8-sq"], "--recipe applies to --target onnx"),
    (["--target", "onnx", "--precision", "int8", "--recipe", "int4"], "does not compute --precision int8"),
    (["--target", "onnx", "--precision", "int4", "--recipe", "decoder=int8-wo"], "recipes for it: int4"),
    (["--target", "onnx", "--precision", "fp32", "--recipe", "int8"], "needs a quantized --precision"),
    (["--target", "onnx", "--precision", "int8", "--recipe", "nope"], "unknown quantization recipe"),
    (["--target", "onnx", "--precision", "int8", "--recipe", "text=int8"], "vision=NAME,decoder=NAME"),
    (["--target", "trt", "--max-context", "0"], "positive"),
])
def test_export_flag_errors(tmp_path, args, says):
    code, out, _ = _run("export", *args, "-o", str(tmp_path / "b"))
    assert code == 2 and says in out and "Traceback" not in out, out
    assert not (tmp_path / "b").exists()


def test_export_recipe_and_max_context_reach_the_manifest(tmp_path, random_ckpt):
    code, out, _ = _run("export", "--model", str(random_ckpt), "--precision", "vision=fp32,decoder=int8",
                        "--recipe", "decoder=int8-sq", "-o", str(tmp_path / "o"))
    assert code == 0, out
    st = json.loads((tmp_path / "o" / "edgemm.json").read_text())["stages"]
    assert st["decoder_text"]["quantization"]["recipe"]["name"] == "int8-sq"
    assert st["decoder_text"]["quantization"]["recipe"]["smoothquant"] == 0.5
    assert st["vision"]["precision"] == "fp32"
    code, out, _ = _run("export", "--model", str(random_ckpt), "--target", "trt", "--precision", "fp16",
                        "--no-build", "--max-context", "96", "--profile", "orin", "-o", str(tmp_path / "t"))
    assert code == 0, out
    trt = json.loads((tmp_path / "t" / "edgemm.json").read_text())["trt"]
    assert trt["max_context"] == 96 and trt["device_class"] == "orin"
    assert trt["profiles"]["orin"]["decoder_text"]["cache_key.0"]["max"][1] == 96


# --------------------------------------------------------------------------- OS and bundle-format errors
def test_unwritable_json_path_is_one_error_line(tmp_path, random_ckpt):
    code, out, r = _run("eval", "--model", str(random_ckpt), "--limit", "1", "--json",
                        str(tmp_path / "no-such-dir" / "x.json"))
    assert code == 2 and "error:" in out and "Traceback" not in out and r.exception.__class__ is SystemExit
    assert not (tmp_path / "no-such-dir").exists()


def test_manifest_without_a_stage_is_one_error_line(tmp_path):
    from edgemm.bundle import FORMAT, FORMAT_VERSION, MANIFEST
    b = tmp_path / "g"
    b.mkdir()
    (b / MANIFEST).write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "target": "gguf",
                                          "stages": {"vision": {"file": "mmproj.gguf"}}}))
    code, out, _ = _run("run", "--bundle", str(b), "hi")
    assert code == 2 and "needs the stages decoder" in out and "Traceback" not in out
    (b / MANIFEST).write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "target": "gguf",
                                          "stages": {"vision": "mmproj.gguf"}}))
    code, out, _ = _run("info", "--bundle", str(b))
    assert code == 2 and "'stages' must map" in out


def test_exporters_take_no_unknown_options_and_get_threads(monkeypatch, tmp_path):
    import edgemm.export.onnx as O
    with pytest.raises(TypeError):
        O.export_onnx(model="tiny-shapes", out=tmp_path / "x", precision="fp32", log=None, max_contxt=5)
    seen = {}
    monkeypatch.setattr(O, "export_onnx", lambda **kw: seen.update(kw))
    code, out, _ = _run("export", "--target", "onnx", "--threads", "1", "-o", str(tmp_path / "b"))
    assert code == 0 and seen["threads"] == 1
    code, out, _ = _run("export", "--target", "gguf", "--keep-sensitive", "0.1", "-o", str(tmp_path / "g"))
    assert code == 2 and "--keep-sensitive applies to --target onnx and trt" in out


@requires_demo
def test_shipped_model_answers_without_torch_after_the_first_run(tmp_path):
    """Cold start: the first run makes a validated ONNX bundle of the shipped model in the cache; later runs
    answer from it without importing torch, with the reference's answer."""
    import importlib.util
    import subprocess
    import sys
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed (pip install 'edgemm[cpu]')")
    from edgemm.generation import GenerationConfig, answer
    from edgemm.runtimes import load_backend
    ref = answer(load_backend("torch", model="tiny-shapes", device="cpu"), "examples/shapes.png",
                 "What color is the circle?", GenerationConfig(max_new_tokens=16))
    env = {**__import__("os").environ, "EDGEMM_CACHE": str(tmp_path / "cache")}
    env.pop("EDGEMM_NO_BUNDLE_CACHE", None)
    code = ("import sys; from edgemm.cli import main; sys.argv = ['edgemm', 'run', '--image', 'examples/shapes.png', "
            "'What color is the circle?']\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('\\nTORCH', 'torch' in sys.modules)")
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "making a validated ONNX bundle" in first.stderr and first.stdout.startswith(ref)
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert again.stdout.startswith(ref) and "TORCH False" in again.stdout, (again.stdout, again.stderr[-500:])
    assert "backend: ort" in again.stderr


@pytest.mark.parametrize("args", [["--body-timeout", "-1"], ["--max-client-connections", "0"]])
def test_serve_slow_client_limits_are_checked(args):
    r = CliRunner().invoke(main, ["serve", *args])
    assert r.exit_code == 2 and "--body-timeout must be >= 0 and --max-client-connections >= 1" in r.output
