"""llama.cpp's options on the llamacpp backend: --kv-cache f16 / q8_0 / q4_0 (flash attention, which a quantized V
cache needs), --device cuda / auto / cpu (layers and projector offloaded where the loaded llama.cpp has a GPU
backend; a CPU-only build refuses cuda in one line), --no-mmproj-offload, the `doctor` and `info` lines, and the
refusal of --kv-cache on the ort backend with ONNX Runtime's evidence.

Run on the CPU-only llama.cpp of this workplace: the GPU path is checked by the arguments llama.cpp receives
(llama_supports_gpu_offload mocked to True), not on a GPU."""
from __future__ import annotations

import importlib.util

import pytest
from click.testing import CliRunner

from edgemm.checkpoint import DEMO_DIR
from edgemm.errors import EdgemmError

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                 reason="llama-cpp-python is not installed (pip install 'edgemm[gguf]')"),
              pytest.mark.skipif(not (DEMO_DIR / "model.safetensors").exists(),
                                 reason="the shipped tiny-shapes weights are not in this checkout")]
N_PROMPTS = 8


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The shipped model as a gguf bundle at the default precision (q8_0 weights: the KV cache defaults to f16)."""
    from edgemm.export.gguf import export_gguf
    out = tmp_path_factory.mktemp("kv") / "demo-q8"
    export_gguf(model="tiny-shapes", out=out, precision={"vision": "q8_0", "decoder": "q8_0"}, log=None)
    return str(out)


def _open(bundle, **kw):
    from edgemm.runtimes import load_backend
    return load_backend("llamacpp", bundle=bundle, threads=1, **kw)


def _answers(b) -> list[str]:
    from edgemm import shapes
    from edgemm.generation import GenerationConfig, answer
    return [answer(b, img, q.question, GenerationConfig(max_new_tokens=8)).strip().lower()
            for img, q in shapes.make_split("test", N_PROMPTS)]


@pytest.fixture(scope="module")
def f16_answers(bundle):
    b = _open(bundle, device="cpu")
    assert b.runner.kv_type == "f16" and not b.runner.flash_attn
    try:
        return _answers(b)
    finally:
        b.close()


def _cli(*args):
    from edgemm.cli import main
    return CliRunner().invoke(main, list(args))


def _error_lines(r) -> list[str]:
    return [ln for ln in r.output.splitlines() if ln.startswith("error:")]


# --------------------------------------------------------------------------- --kv-cache
@pytest.mark.parametrize("kv", ["q8_0", "q4_0"])
def test_quantized_kv_cache_answers(bundle, f16_answers, kv):
    """A quantized KV cache runs (flash attention turned on for it) and answers the shapes test prompts: q8_0 as
    the f16 cache does, q4_0 at most one answer apart."""
    from edgemm import shapes
    b = _open(bundle, device="cpu", kv_cache=kv)
    try:
        assert b.runner.kv_type == kv and b.runner.flash_attn
        assert f"KV cache {kv}, flash attention" in b.describe()
        got = _answers(b)
    finally:
        b.close()
    want = [q.answer.lower() for _, q in shapes.make_split("test", N_PROMPTS)]
    assert sum(g == w for g, w in zip(f16_answers, want)) >= N_PROMPTS - 1       # the f16 baseline answers
    same = sum(g == f for g, f in zip(got, f16_answers))
    assert same >= (N_PROMPTS if kv == "q8_0" else N_PROMPTS - 1), (kv, got, f16_answers)


@pytest.mark.parametrize("kv", ["q8_0", "q4_0"])
def test_quantized_v_without_flash_attention_is_refused(bundle, kv):
    """llama.cpp itself refuses a quantized V cache without flash attention (llama_init_from_model returns NULL):
    one clear error, not a crash. (The backend never asks for it: a quantized --kv-cache turns flash attention
    on.)"""
    import json
    from pathlib import Path
    from edgemm.runtimes.llamacpp_runner import LlamaRunner
    dec = Path(bundle) / json.loads((Path(bundle) / "edgemm.json").read_text())["stages"]["decoder"]["file"]
    with pytest.raises(EdgemmError, match=f"KV cache {kv}: llama.cpp's quantized V cache needs flash attention"):
        LlamaRunner(dec, 64, threads=1, kv_type=kv, flash_attn=False)
    r = LlamaRunner(dec, 64, threads=1, kv_type=kv, flash_attn=True)      # the same with flash attention runs
    try:
        assert r.kv_type == kv and r.decode_tokens([1, 2, 3], 0).shape == (r.n_vocab,)
    finally:
        r.close()


def test_kv_cache_blocks_need_head_width_multiple_of_32(bundle):
    """q8_0 / q4_0 store 32 values a block: heads of another width are refused before llama.cpp sees them."""
    from edgemm.bundle import verify_bundle
    from edgemm.runtimes.llamacpp_backend import LlamaCppBackend
    m = verify_bundle(bundle)
    m["model"]["decoder"]["n_heads"] = 16                   # 256 / 16 = 16-wide heads (a made-up config)
    with pytest.raises(EdgemmError, match="blocks of 32 values and this model's attention heads are 16 wide"):
        LlamaCppBackend(bundle, m, threads=1, kv_cache="q4_0")


def test_cli_kv_cache_runs(bundle):
    r = _cli("run", "--bundle", bundle, "--kv-cache", "q8_0", "--device", "cpu", "--threads", "1",
             "--image", "examples/shapes.png", "What color is the circle?")
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1].strip()


def test_ort_refuses_kv_cache_with_the_evidence(tmp_path):
    """A llama.cpp --kv-cache type on the ort backend: one line that says what ONNX Runtime's GroupQueryAttention
    allows here (its schema's k_scale / v_scale inputs: the ort backend's --kv-cache int8, tests/test_ort_kv.py)."""
    ort = pytest.importorskip("onnxruntime")
    from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema
    gqa = next(x for x in get_all_operator_schema() if x.name == "GroupQueryAttention")
    has_scales = {"k_scale", "v_scale"} <= {i.name for i in gqa.inputs}
    r = _cli("run", "--bundle", str(tmp_path), "--backend", "ort", "--kv-cache", "q8_0", "hello")
    assert r.exit_code == 2
    (line,) = _error_lines(r)
    assert f"ONNX Runtime {ort.__version__}'s GroupQueryAttention" in line
    assert ("does take an int8 cache" in line) == has_scales and ("has no quantized KV cache" in line) != has_scales
    assert ("the ort backend takes --kv-cache int8" in line) == has_scales
    r = _cli("run", "--bundle", str(tmp_path), "--backend", "torch", "--kv-cache", "q4_0", "hello")
    assert r.exit_code == 2 and "applies to the llamacpp backend" in _error_lines(r)[0]


def test_info_shows_kv_bytes_at_the_type(bundle):
    """q8_0: 34 bytes per 32 values, 17/32 of f16's bytes; q4_0 18 per 32."""
    from edgemm.config import ModelConfig
    from edgemm.bundle import read_manifest
    from edgemm.info import _fmt, kv_cache_bytes
    cfg = ModelConfig.from_dict(read_manifest(bundle)["model"])
    for kv, per in (("q8_0", 34 / 32), ("q4_0", 18 / 32)):
        r = _cli("info", "--bundle", bundle, "--kv-cache", kv, "--context", "512")
        assert r.exit_code == 0, r.output
        line = r.output.splitlines()[-1]
        q, f16 = kv_cache_bytes(cfg, 512, per), kv_cache_bytes(cfg, 512)
        assert q / f16 == per / 2
        assert f"ctx    512  {_fmt(q):>10}  (f16 {_fmt(f16):>10}, {per / 2:.2f}x)" in line, line
    assert "0.53x" in _cli("info", "--bundle", bundle, "--kv-cache", "q8_0").output


def test_bench_compares_kv_cache_types(bundle):
    """`edgemm bench B --kv-cache f16 --kv-cache q8_0`: one row per type, each measured on that cache (accuracy
    on the test split's first questions included)."""
    from edgemm.bench import bench
    rep = bench([bundle], backends=("llamacpp",), kv_caches=("f16", "q8_0"), limit=16, repeats=1, warmup=0,
                decode_steps=2, threads=1, fidelity_n=0, isolate=False, progress=False, log=None)
    rows = rep["results"]
    assert [r["name"].rsplit(" ", 2)[1:] for r in rows] == [["kv", "f16"], ["kv", "q8_0"]]
    assert "KV cache f16," in rows[0]["describe"] and "KV cache q8_0, flash attention" in rows[1]["describe"]
    assert rows[0]["total"] == rows[1]["total"] == 16 and rows[1]["accuracy"] == rows[0]["accuracy"] >= 0.8
    assert rep["settings"]["kv_caches"] == ["f16", "q8_0"]


def test_info_kv_cache_refused_for_an_onnx_bundle(bundle, monkeypatch):
    """--kv-cache q8_0 in info is llama.cpp's: another target's bundle is refused, naming it (int8 on an onnx
    bundle is the ort backend's: tests/test_ort_kv.py)."""
    from edgemm import bundle as bundle_mod, info
    man = bundle_mod.read_manifest(bundle)
    monkeypatch.setattr(bundle_mod, "read_manifest", lambda b: dict(man, target="onnx"))   # an onnx manifest
    monkeypatch.setattr(info, "describe_bundle", lambda b, contexts=None: ["(described)"])
    with pytest.raises(EdgemmError, match="--kv-cache q8_0 is llama.cpp's .* is a onnx bundle"):
        info.describe(bundle=bundle, kv_cache="q8_0")
    assert info.describe(bundle=bundle) == "(described)"


# --------------------------------------------------------------------------- --device
def _cpu_only():
    from edgemm.llamacpp import gpu_offload, load_llama_cpp
    if gpu_offload(load_llama_cpp()):
        pytest.skip("this llama.cpp has a GPU backend: the CPU-only lines are not said here")


def test_device_cuda_refused_on_a_cpu_only_build(bundle):
    _cpu_only()
    r = _cli("run", "--bundle", bundle, "--device", "cuda", "--threads", "1", "hello")
    assert r.exit_code == 2
    (line,) = _error_lines(r)
    assert line.startswith("error: --device cuda: this llama.cpp build has no GPU backend") and "README" in line


def test_auto_runs_on_the_cpu_and_says_so_once(bundle, monkeypatch):
    _cpu_only()
    from edgemm.runtimes import llamacpp_backend as lb
    monkeypatch.setattr(lb, "_SAID_CPU", [])
    notes = []
    for _ in range(2):
        b = _open(bundle, device="auto", log=notes.append)
        assert b.device == "cpu" and b.describe().startswith("llamacpp on cpu (")
        b.close()
    assert notes == ["note: this llama.cpp build has no GPU backend: the llamacpp backend runs on the CPU"]
    notes.clear()
    _open(bundle, device="cpu", log=notes.append).close()
    assert notes == []


def test_doctor_lists_llama_cpp_gpu_backends():
    from edgemm.doctor import llama_gpu_line, probe_llama_cpp
    ll = probe_llama_cpp()
    assert ll["ok"], ll
    assert any(d["type"] == "cpu" for d in ll["devices"])
    assert ll["gpu_offload"] == any(d["type"] in ("gpu", "igpu") for d in ll["devices"])
    if not ll["gpu_offload"]:
        assert llama_gpu_line(ll).strip().startswith("GPU backends: none (this llama.cpp build has no GPU backend")
    fake = {"devices": [{"backend": "CUDA", "name": "CUDA0", "description": "Orin", "type": "gpu"},
                        {"backend": "CPU", "name": "CPU", "description": "ARMv8", "type": "cpu"}]}
    assert llama_gpu_line(fake).strip().startswith("GPU backends: CUDA CUDA0 (Orin);")


@pytest.fixture
def offload_args(monkeypatch):
    """llama_supports_gpu_offload -> True; record n_gpu_layers of each model load and use_gpu of each mtmd context
    (then load for real: the CPU-only llama.cpp keeps everything on the CPU)."""
    import llama_cpp
    from llama_cpp import mtmd_cpp
    seen = {"n_gpu_layers": [], "use_gpu": []}
    load, init = llama_cpp.llama_model_load_from_file, mtmd_cpp.mtmd_init_from_file

    def load_spy(path, params):
        seen["n_gpu_layers"].append(params.n_gpu_layers)
        return load(path, params)

    def init_spy(path, model, params):
        seen["use_gpu"].append(params.use_gpu)
        return init(path, model, params)
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    monkeypatch.setattr(llama_cpp, "llama_model_load_from_file", load_spy)
    monkeypatch.setattr(mtmd_cpp, "mtmd_init_from_file", init_spy)
    return seen


@pytest.mark.parametrize("device,offload,layers,use_gpu", [("auto", True, -1, True), ("cuda", True, -1, True),
                                                           ("cuda", False, -1, False), ("cpu", True, 0, False)])
def test_gpu_build_offloads_layers_and_projector(bundle, offload_args, device, offload, layers, use_gpu):
    from edgemm.tilings import image_rows
    b = _open(bundle, device=device, mmproj_offload=offload)
    try:
        assert b.device == ("cpu" if device == "cpu" else "cuda")
        assert image_rows(b, "examples/shapes.png").shape == (1, b.cfg.n_image_rows, b.cfg.decoder.d_model)
        assert b.vision_source == "mtmd (mmproj)"
    finally:
        b.close()
    assert offload_args == {"n_gpu_layers": [layers], "use_gpu": [use_gpu]}
    if device != "cpu":
        want = "projector on the GPU" if offload else "projector on the CPU (--no-mmproj-offload)"
        assert want in b.describe() and b.describe().startswith("llamacpp on cuda (all layers offloaded")


def test_no_mmproj_offload_is_llama_cpps():
    r = _cli("run", "--backend", "torch", "--no-mmproj-offload", "hello")
    assert r.exit_code == 2 and "--no-mmproj-offload applies to the llamacpp backend" in _error_lines(r)[0]


def test_serve_passes_kv_cache_to_the_backend(bundle):
    """`edgemm serve --kv-cache q8_0`: load_models opens each model with it (the one place options reach a backend
    is load_backend); --ray refuses it for now."""
    pytest.importorskip("fastapi")
    from edgemm.serve import load_models
    models = load_models(bundles=[bundle], backend="llamacpp", device="cpu", threads=1, parallel=2, kv_cache="q8_0")
    (m,) = models.values()
    try:
        assert m.backend.runner.kv_type == "q8_0" and m.backend.runner.n_seq == 2
    finally:
        m.backend.close()
    r = _cli("serve", "--bundle", bundle, "--kv-cache", "q8_0", "--ray-config", "x.yaml")
    assert r.exit_code == 2 and "not passed to Ray Serve replicas" in _error_lines(r)[0]
