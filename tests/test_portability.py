"""Runs right on every CPU it installs on: llama.cpp's CPU variant picked at run time (checked in a child process,
and under an emulated AVX2-only CPU), int8 numerics that do not depend on VNNI, `edgemm doctor`."""
from __future__ import annotations

import importlib.util
import json
import platform
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
needs_llama = pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed (pip install 'edgemm[gguf]')")
QEMU = shutil.which("qemu-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None or platform.machine() != "x86_64",
                                reason="needs qemu-x86_64 (Debian's qemu-user) on an x86_64 machine to emulate an "
                                       "AVX2-only CPU")
HASWELL = [QEMU or "qemu-x86_64", "-cpu", "Haswell"]
# what a Haswell's kernel lists (the AVX2 level: no AVX-512, no VNNI)
HASWELL_FLAGS = "sse4_2 avx f16c fma bmi2 avx2 popcnt"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, random_ckpt):
    from edgemm.checkpoint import load_checkpoint
    from edgemm.export.gguf import write_decoder_gguf
    m, tok = load_checkpoint(random_ckpt)
    p = tmp_path_factory.mktemp("gguf") / "decoder.gguf"
    write_decoder_gguf(m, tok, p, "t")
    return p


@pytest.fixture(scope="module")
def tiny_gguf_q8(tiny_gguf):
    """The same decoder quantized to q8_0 by llama.cpp (the quantized matmuls are where AMX kernels run)."""
    from edgemm.export.gguf import quantize_decoder
    p = tiny_gguf.with_name("decoder-q8_0.gguf")
    quantize_decoder(tiny_gguf, p, "q8_0", 1)
    return p


def _fail_msg(r: dict) -> str:
    from edgemm import cpu
    return f"{r.get('error')} [CPU flags: {cpu.x86_summary()}]"


# --------------------------------------------------------------------------- llama.cpp
@needs_llama
def test_llama_cpp_decodes_in_a_child_process(tiny_gguf):
    """A bad build (SIGILL) fails this one test with the CPU flags, instead of killing the whole suite."""
    from edgemm.doctor import probe_llama_cpp
    r = probe_llama_cpp(gguf=tiny_gguf)
    assert r["ok"], _fail_msg(r)
    assert r["decoded"]["finite"] and r["decoded"]["tokens"] == 3
    assert r["variant"], r


@needs_llama
def test_llama_cpp_decodes_q8_0_in_a_child_process(tiny_gguf_q8):
    """A quantized decode with the variant the loader picks (on a Xeon with AMX the kernel enables, llama.cpp's
    AMX variant died here with SIGILL and took the whole suite with it)."""
    from edgemm.doctor import probe_llama_cpp
    r = probe_llama_cpp(gguf=tiny_gguf_q8)
    assert r["ok"], _fail_msg(r)
    assert r["decoded"]["finite"] and r["decoded"]["tokens"] == 3
    from edgemm.llamacpp import AMX_VARIANTS
    assert r["variant"] not in AMX_VARIANTS, r


def test_amx_variants_are_opt_in():
    """With every instruction set listed, the AMX variant is only a candidate with EDGEMM_GGML_AMX=1; flags the
    kernel lacks rule a variant out either way."""
    from edgemm.llamacpp import X86_VARIANT_FLAGS, variant_candidates
    spr = frozenset(X86_VARIANT_FLAGS["sapphirerapids"])
    ok, skipped = variant_candidates(["haswell", "zen4", "sapphirerapids"], spr, allow_amx=False)
    assert ok == ["haswell", "zen4"] and "EDGEMM_GGML_AMX=1" in skipped["sapphirerapids"]
    ok, _ = variant_candidates(["haswell", "zen4", "sapphirerapids"], spr, allow_amx=True)
    assert ok == ["haswell", "zen4", "sapphirerapids"]
    ok, skipped = variant_candidates(["haswell", "zen4", "sapphirerapids", "riscv"], frozenset(HASWELL_FLAGS.split()),
                                     allow_amx=True)
    assert ok == ["haswell"] and set(skipped) == {"zen4", "sapphirerapids", "riscv"}
    assert variant_candidates(["zen4", "sapphirerapids"], None, allow_amx=False)[0] == ["zen4"]
    assert variant_candidates(["armv8.2_1"], None, x86=False)[0] == ["armv8.2_1"]


@needs_llama
def test_llama_cpp_variant_follows_the_kernel_flags(tiny_gguf):
    """The loader only considers variants whose instruction sets the kernel lists: with an AVX2-level flag list
    (what a Haswell's or an AVX-512-disabled kernel reports) it must load haswell, whatever CPUID says."""
    from edgemm.doctor import probe_llama_cpp
    r = probe_llama_cpp(gguf=tiny_gguf, env={"EDGEMM_CPU_FLAGS": HASWELL_FLAGS})
    assert r["ok"], _fail_msg(r)
    if r["variant"].startswith("built-in"):
        pytest.skip("this llama-cpp-python is a monolithic build (no runtime CPU dispatch): " + r["why"])
    assert r["variant"] == "haswell" and "AVX512" not in r["features"], r
    bare = probe_llama_cpp(env={"EDGEMM_CPU_FLAGS": ""})            # no SIMD at all: the x64 baseline variant
    assert bare["ok"] and bare["variant"] == "x64", bare


@needs_llama
@needs_qemu
def test_llama_cpp_runs_on_an_emulated_avx2_cpu(tiny_gguf):
    """qemu's Haswell model has AVX2 and no AVX-512: the build must pick a variant it runs and decode."""
    from edgemm.doctor import probe_llama_cpp
    r = probe_llama_cpp(gguf=tiny_gguf, wrapper=HASWELL, env={"EDGEMM_CPU_FLAGS": HASWELL_FLAGS}, timeout=600)
    assert r["ok"], f"under qemu -cpu Haswell: {r.get('error')}"
    assert r["decoded"]["finite"]
    native = probe_llama_cpp(gguf=tiny_gguf)
    assert native["ok"] and r["decoded"]["argmax"] == native["decoded"]["argmax"]
    if not r["variant"].startswith("built-in"):
        assert r["variant"] == "haswell", r


def test_monolithic_feature_parse():
    from edgemm.llamacpp import _compiled_features
    info = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 0 | AVX512_VNNI = 1 | OPENMP = 1 | "
    assert _compiled_features(info) == ["SSE3", "SSSE3", "AVX", "AVX2", "AVX512_VNNI", "OPENMP"]


def test_variant_table_is_ordered_by_instruction_sets():
    """Every variant's kernel flags include those of the variants it extends (the table is what filters them)."""
    from edgemm.llamacpp import X86_VARIANT_FLAGS as V
    for a, b in [("sse42", "sandybridge"), ("sandybridge", "haswell"), ("haswell", "skylakex"),
                 ("skylakex", "icelake"), ("icelake", "zen4"), ("haswell", "alderlake"), ("zen4", "sapphirerapids")]:
        assert set(V[a]) < set(V[b]), (a, b)
    assert "amx_int8" in V["sapphirerapids"] and not any("avx512" in f for f in V["alderlake"])


# --------------------------------------------------------------------------- int8 numerics without VNNI
_QDQ_CHILD = textwrap.dedent("""
    import sys, numpy as np, onnxruntime as ort
    x = np.load(sys.argv[1])
    out = {}
    for path in sys.argv[2:]:
        so = ort.SessionOptions(); so.intra_op_num_threads = 1
        out[path] = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.savez(sys.argv[1] + ".out.npz", *[out[p] for p in sys.argv[2:]])
""")


def _stage(tmp_path, storage):
    """A 64 -> 48 MatMul quantized int8 by the project's quantizer with per-channel weights (where the s8s8
    saturation shows: every column's largest weight is +-127)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from edgemm.calib.quantize import quantize_stage
    from edgemm.calib.stats import LayerStats, Stats
    rng = np.random.default_rng(0)
    K, N = 64, 48
    W = (rng.standard_normal((K, N)) * 0.1).astype(np.float32)
    x = rng.standard_normal((1, 5, K)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "n", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(W, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "in.onnx")
    ls = LayerStats("decoder_text/l", "decoder_text", "l", "text", K, wsig=W[:2].copy(), weight_absmax=np.abs(W).max(1))
    ls.add(x, rng)
    out = tmp_path / f"{storage}.onnx"
    quantize_stage(tmp_path / "in.onnx", out, "decoder_text", "int8", stats=Stats({"decoder_text/l": ls}, {"digest": "t"}),
                   log=None, method="max", int8_storage=storage)
    from edgemm.calib.quantize import fake_quant_act, quant_weight_per_channel
    want = fake_quant_act(x, float(np.abs(x).max()), "int8") @ quant_weight_per_channel(W, "int8")[2]
    return x, out, want


@needs_qemu
def test_int8_u8u8_is_exact_on_an_emulated_avx2_cpu(tmp_path):
    """An s8s8 graph converted to u8u8 (what the ort backend does at load without VNNI) gives the fake-quant
    numbers on a CPU without VNNI; the s8s8 graph as stored does not there (which also shows the emulated CPU
    really took ONNX Runtime's non-VNNI kernels)."""
    pytest.importorskip("onnxruntime")
    import onnx
    from edgemm.calib.quantize import to_u8u8
    x, s8, want = _stage(tmp_path, "s8s8")
    m = onnx.load(s8)
    assert to_u8u8(m) > 0
    u8 = tmp_path / "converted.onnx"
    onnx.save(m, u8)
    direct = onnx.load(_stage(tmp_path, "u8u8")[1])       # the conversion = quantizing to u8u8 directly
    assert sorted(t.SerializeToString() for t in m.graph.initializer) == sorted(
        t.SerializeToString() for t in direct.graph.initializer)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "child.py").write_text(_QDQ_CHILD)
    r = subprocess.run(HASWELL + [sys.executable, str(tmp_path / "child.py"), str(tmp_path / "x.npy"), str(u8), str(s8)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-800:]
    res = np.load(tmp_path / "x.npy.out.npz")
    got_u8, got_s8 = res["arr_0"], res["arr_1"]
    np.testing.assert_allclose(got_u8, want, rtol=1e-4, atol=1e-4)
    assert np.abs(got_s8 - want).max() > 0.05, "s8s8 did not saturate: qemu's CPU model took a VNNI path?"


def test_which_stages_need_u8u8_without_vnni(monkeypatch):
    """s8s8 W8A8 stages (what bundles store; older bundles record no storage) are run as u8u8 on CPUs where the
    fused kernels would saturate; u8u8 and weight-only stages are left as they are."""
    from edgemm import cpu
    from edgemm.runtimes.ort_backend import s8s8_stages
    w8a8 = {"recipe": {"activations": "int8"}}
    stages = {"decoder_text": {"precision": "int8", "quantization": dict(w8a8, int8_storage="u8u8")},
              "decoder_image": {"precision": "int8", "quantization": w8a8},                   # an older bundle
              "vision": {"precision": "int8", "quantization": {"recipe": {"activations": None}}}}   # int8-wo
    assert s8s8_stages(stages, list(stages)) == ["decoder_image"]
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert not cpu.s8s8_int8_exact(frozenset(HASWELL_FLAGS.split()))
    assert cpu.s8s8_int8_exact(frozenset(HASWELL_FLAGS.split() + ["avx512_vnni"]))
    assert cpu.s8s8_int8_exact(frozenset(HASWELL_FLAGS.split() + ["avx_vnni"]))
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert cpu.s8s8_int8_exact(frozenset())


def test_cpu_flags_override_and_parse(monkeypatch):
    from edgemm import cpu
    assert cpu._read_flags("processor : 0\nflags : fpu avx2 avx512f\n") == {"fpu", "avx2", "avx512f"}
    assert cpu._read_flags("Features : fp asimd asimddp\n") == {"fp", "asimd", "asimddp"}
    cpu.cpu_flags.cache_clear()
    monkeypatch.setenv("EDGEMM_CPU_FLAGS", "avx avx2")
    try:
        assert cpu.cpu_flags() == {"avx", "avx2"}
    finally:
        cpu.cpu_flags.cache_clear()


# --------------------------------------------------------------------------- doctor
def test_doctor_cli(tmp_path):
    from click.testing import CliRunner
    from edgemm.cli import main
    r = CliRunner().invoke(main, ["doctor", "--json", str(tmp_path / "d.json")])
    assert r.exit_code == 0, r.output
    for head in ("cpu:", "instructions:", "llama.cpp:", "onnxruntime:", "gpu:", "tensorrt:", "extras:"):
        assert head in r.output
    f = json.loads((tmp_path / "d.json").read_text())
    assert f["cpu"]["cores"] >= 1 and "llama_cpp" in f and "extras" in f
    if HAVE_LLAMA:
        assert f["llama_cpp"]["ok"], f["llama_cpp"]
        assert f"CPU variant {f['llama_cpp']['variant']}" in r.output
    r = CliRunner().invoke(main, ["doctor", "--bundle", str(tmp_path / "nope")])
    assert r.exit_code == 0 and "auto picks nothing" in r.output and "not a directory" in r.output
