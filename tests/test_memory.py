"""The memory planner (edgemm/memory.py, issue 31 item 4): size parsing, the KV layouts the backends really
allocate, the auto-fit choice, the one-line refusal of `edgemm serve --memory`, `edgemm info --parallel`, and the
estimate against the peak RSS of a process that loaded a bundle (or, on torch, the checkpoint) and filled every
slot's cache (within 15%)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgemm.errors import EdgemmError
from edgemm.memory import MiB, GiB, fmt_size, kv_bytes, memory_of, parse_size, plan, serve_chunk

pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")

CTX = 2048
CHUNK = serve_chunk()          # serve's prefill chunk (edgemm.serve.engine.PREFILL_CHUNK; None: whole prompts)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    """tiny-shapes with 4 decoder layers and a 2048-token context: 4 KiB (f16) / 8 KiB (f32) of KV per token, so
    a few slots' caches outweigh the weights and the noise."""
    from edgemm.checkpoint import save_checkpoint
    from edgemm.config import get_preset
    from edgemm.model import EdgeMM
    cfg = get_preset("tiny-shapes")
    cfg.decoder.n_layers, cfg.decoder.max_seq_len = 4, CTX
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("mem") / "ckpt"
    save_checkpoint(EdgeMM(cfg).init_weights(seed=3).eval(), tokenizer, out)
    return out


@pytest.fixture(scope="module")
def onnx_bundle(ckpt, tmp_path_factory):
    from edgemm.export.onnx import export_onnx
    out = tmp_path_factory.mktemp("mem") / "fp32"
    export_onnx(model=str(ckpt), out=out, precision="fp32", threads=1, log=None, seed=1)
    return out


@pytest.fixture(scope="module")
def gguf_bundle(ckpt, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from edgemm.export.gguf import export_gguf
    out = tmp_path_factory.mktemp("mem") / "f16"
    export_gguf(model=str(ckpt), out=out, precision="f16", log=None, threads=1)
    return out


def test_parse_size():
    assert parse_size("6GiB") == 6 * GiB and parse_size("6G") == 6_000_000_000 == parse_size("6e9")
    assert parse_size("512MiB") == 512 * MiB and parse_size("1.5 gib") == 3 * GiB // 2 and parse_size(4096) == 4096
    for bad in ("6X", "", "GiB", "-1G", "0", "6 GiB s", "1e99"):
        with pytest.raises(EdgemmError, match="memory size"):
            parse_size(bad)


def test_kv_bytes_are_what_the_backends_allocate(onnx_bundle):
    """ort: a [slots, K, ctx + 1, E] pool per layer for K and V (fp32); llama.cpp's layout at each type."""
    from edgemm.runtimes import load_backend
    b = load_backend("ort", bundle=str(onnx_bundle), slots=3, threads=1, context=512)
    assert b.context_length == 512
    states = [b.new_state(max_len=b.context_length) for _ in range(3)]
    held = sum(a.nbytes for a in b._pool.arrays)
    assert held == kv_bytes(b.cfg.decoder, 512, 3, "f32", rows_extra=1)
    assert memory_of(bundle=str(onnx_bundle)).estimate(512, 3).kv == held
    del states
    d = b.cfg.decoder           # 4 layers x 4 heads x 64 wide: 2 KiB per token per type byte
    assert kv_bytes(d, 1024, 2, "f16") == 2 * 4 * 4 * 64 * 1024 * 2 * 2
    assert kv_bytes(d, 1024, 2, "q8_0") == kv_bytes(d, 1024, 2, 34 / 32) == kv_bytes(d, 1024, 2, "f16") * 17 / 32
    with pytest.raises(EdgemmError, match="KV cache type"):
        kv_bytes(d, 1024, 1, "q3")


def test_llamacpp_context_is_its_n_ctx(gguf_bundle):
    """--context reaches llama.cpp's context: n_ctx cells per sequence, so the KV the planner counts."""
    from edgemm.runtimes import load_backend
    b = load_backend("llamacpp", bundle=str(gguf_bundle), slots=2, threads=1, context=512)
    assert b.context_length == b.runner.n_ctx == 512 and b.runner.n_seq == 2
    assert b.runner.ll.llama_n_ctx(b.runner.ctx) == 1024
    b.close()


def test_auto_fit(onnx_bundle):
    m = memory_of(bundle=str(onnx_bundle), chunk=CHUNK)
    t3 = m.estimate(CTX, 3).total
    assert plan(int(t3) + 1, [m])[:2] == (CTX, 3)                                   # the most slots at full context
    assert plan(int(t3) - 1, [m])[:2] == (CTX, 2)
    assert plan(int(t3) + 1, [m], context=1024)[1] > 3                             # a shorter context: more slots
    one = m.estimate(CTX, 1).total                                                 # not one slot at full context:
    c, s, (e,) = plan(int(one) - 1, [m])                                           # the longest that fits
    assert s == 1 and c % 256 == 0 and c < CTX and e.total <= one - 1 < m.estimate(c + 256, 1).total
    assert plan(int(t3) + 1, [m], context=CTX, slots=3)[:2] == (CTX, 3)           # given ones are checked
    with pytest.raises(EdgemmError, match=r"holds weights .* KV for 2 slot\(s\) x 2048 tokens; --parallel 3 at "
                                          r"--context 2048 needs .*: use --parallel 2 or --context \d+$"):
        plan(int(t3) - 1, [m], context=CTX, slots=3)
    with pytest.raises(EdgemmError, match="does not hold the model"):
        plan(50 * MiB, [m])


def _cli(*args):
    from click.testing import CliRunner
    from edgemm.cli import main
    r = CliRunner().invoke(main, list(args))
    r.returncode = r.exit_code
    return r


def test_serve_refuses_in_one_line(onnx_bundle):
    m = memory_of(bundle=str(onnx_bundle), chunk=CHUNK)
    budget = int(m.estimate(CTX, 2).total) + MiB
    # (a host off loopback without an API key: a plan that passed would be refused there, never served)
    serve = ("serve", "--bundle", str(onnx_bundle), "--host", "192.0.2.1")
    r = _cli(*serve, "--memory", f"{budget / MiB:.2f}MiB", "--parallel", "4", "--context", "2048")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--parallel 4 at --context 2048 needs" in lines[0], r.stderr
    assert "KV for 2 slot(s) x 2048 tokens" in lines[0] and "use --parallel 2 or --context " in lines[0]
    c = int(lines[0].rsplit(" ", 1)[1])                                  # the context it offers does fit
    assert m.estimate(c, 4).total <= budget < m.estimate(c + 256, 4).total
    r = _cli(*serve, "--memory", "6 bytes")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "memory size '6 bytes'" in r.stderr
    r = _cli(*serve, "--memory", f"{budget / MiB:.2f}MiB", "--parallel", "4")    # the context is fitted instead
    assert r.returncode == 2 and f"fits 4 slot(s) x {c} tokens (chosen: --context {c})" in r.stderr
    assert "exposes the server beyond this machine" in r.stderr.splitlines()[-1]


def test_info_plans(onnx_bundle):
    r = _cli("info", "--bundle", str(onnx_bundle), "--context", "1024", "--parallel", "3")
    assert r.returncode == 0, r.stderr
    e = memory_of(bundle=str(onnx_bundle), chunk=CHUNK).estimate(1024, 3)
    out = r.stdout.split("memory plan on ort (3 slot(s) x 1024 tokens")[1].splitlines()
    rows = {ln[:42].strip(): ln[42:].strip() for ln in out[1:]}
    assert rows["KV cache (3 x 1024 tokens, f32)"] == fmt_size(e.kv) == "24.0 MiB"      # 3 x 1025 rows x 8 KiB
    assert rows["total"] == fmt_size(e.total) and rows["weights"] == fmt_size(e.weights)
    r = _cli("info", "--bundle", str(onnx_bundle), "--memory", f"{int(e.total) + 1}")
    assert r.returncode == 0 and "fits" in r.stdout, r.stderr
    r = _cli("info", "--bundle", str(onnx_bundle), "--context", "1024", "--parallel", "9", "--memory",
             f"{int(e.total) + 1}")
    assert r.returncode == 2 and "use --parallel 3" in r.stderr and r.stderr.count("\n") == 1


# A process that imports the backend's libraries and, unless `base`, opens the bundle with `slots` at `ctx`,
# encodes an image into every slot and fills its cache in serve's prefill chunks, decodes, and prints its
# peak resident memory (VmHWM).
PROBE = r"""
import sys, json, importlib
import numpy as np
backend, bundle, ctx, slots, mode, chunk = sys.argv[1:7]
ctx, slots, chunk = int(ctx), int(slots), int(chunk)
import PIL.Image, edgemm.tilings, edgemm.bundle, edgemm.tokenizer, edgemm.runtimes
importlib.import_module(f"edgemm.runtimes.{backend}_backend")
if backend == "ort":
    import onnxruntime
elif backend == "torch":
    import torch, edgemm.model, edgemm.checkpoint
else:
    from edgemm.llamacpp import load_llama_cpp
    load_llama_cpp()
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
if mode == "run":
    where = {"model" if backend == "torch" else "bundle": bundle}
    b = edgemm.runtimes.load_backend(backend, **where, slots=slots, threads=1, context=ctx)
    assert b.context_length == ctx
    rng = np.random.default_rng(0)
    S, V = b.cfg.vision.image_size, b.cfg.decoder.vocab_size
    img = PIL.Image.fromarray(rng.integers(0, 255, (S, S, 3), dtype=np.uint8))
    rows = edgemm.tilings.encode_pixels(b, edgemm.tilings.preprocess_image(img, b.cfg.vision))
    states = [b.new_state(max_len=ctx) for _ in range(slots)]
    for st in states:
        b.text(st, [1, 2, 3])
        b.image(st, rows)
        n = ctx - 8 - st.length
        for a in range(0, n, chunk):
            b.text(st, rng.integers(4, V, min(chunk, n - a)).tolist())
    for _ in range(3):
        b.decode_batch(states, [5] * slots)
print(json.dumps({"hwm": hwm()}))
"""


def _peak(*args) -> int:
    r = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])["hwm"]


@pytest.mark.parametrize("backend,slots", [("ort", 3), ("llamacpp", 4), ("torch", 4)])
def test_estimate_within_15_percent_of_peak_rss(backend, slots, request):
    bundle = request.getfixturevalue({"ort": "onnx_bundle", "llamacpp": "gguf_bundle", "torch": "ckpt"}[backend])
    base = _peak(backend, bundle, CTX, slots, "base", CHUNK or CTX)
    measured = _peak(backend, bundle, CTX, slots, "run", CHUNK or CTX) - base
    e = (memory_of(model=str(bundle), chunk=CHUNK) if backend == "torch" else
         memory_of(bundle=str(bundle), backend=backend, chunk=CHUNK)).estimate(CTX, slots)
    assert e.kv > 0.25 * e.model                # the caches are a large share of what is measured
    print(f"{backend}: {slots} slots x {CTX}: estimate {e.model / MiB:.1f} MiB (weights {e.weights / MiB:.1f}, "
          f"KV {e.kv / MiB:.1f}, buffers {(e.vision + e.buffers) / MiB:.1f}, runtime {e.runtime / MiB:.1f}); "
          f"measured peak RSS {measured / MiB:.1f} MiB over a {base / MiB:.1f} MiB baseline")
    assert abs(e.model - measured) <= 0.15 * measured
