"""Every silent fallback says what it does, in one line: each is triggered here (the failing piece monkeypatched)
and its line looked for."""
from __future__ import annotations

import importlib.util
import types

import pytest

from tests.conftest import requires_demo

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None


def _broken_cuda(monkeypatch):
    """torch with a CUDA driver that is there but fails (as an old or mismatched driver does)."""
    import torch

    def fail(*a, **kw):
        raise RuntimeError("CUDA driver version is insufficient for CUDA runtime version\n(more detail)")
    monkeypatch.setattr(torch.cuda, "is_available", fail)


def test_trt_gpu_identity_says_a_broken_driver_once(monkeypatch, capsys):
    import edgemm.runtimes.trt_backend as TB
    _broken_cuda(monkeypatch)
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    monkeypatch.setattr(TB, "_SAID", set())
    assert TB.gpu_identity() is None and TB.gpu_identity() is None
    err = capsys.readouterr().err.splitlines()
    assert err == ["edgemm: CUDA present but unusable (CUDA driver version is insufficient for CUDA runtime version): "
                   "TensorRT engines are neither built nor run; running on the CPU"]


def test_trt_gpu_identity_without_tensorrt_says_nothing(monkeypatch, capsys):
    """No TensorRT is not a failure: nothing to say (the backend's own refusal names it)."""
    import edgemm.runtimes.trt_backend as TB
    monkeypatch.setitem(__import__("sys").modules, "tensorrt", None)          # import tensorrt -> ImportError
    assert TB.gpu_identity() is None
    assert capsys.readouterr().err == ""


def test_torch_device_auto_says_a_broken_driver(monkeypatch, capsys):
    import torch
    from edgemm.runtimes.torch_backend import pick_torch_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = torch.zeros

    def zeros(*a, device=None, **kw):
        if device == "cuda":
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
        return real(*a, device=device, **kw)
    monkeypatch.setattr(torch, "zeros", zeros)
    lines = []
    assert pick_torch_device("auto", lines.append) == "cpu"            # not asked for CUDA: said all the same
    assert lines == ["note: CUDA present but unusable (CUDA error: no kernel image is available for execution on "
                     "the device): running on the CPU"]
    assert pick_torch_device("auto") == "cpu"                          # no log given: stderr
    assert "CUDA present but unusable" in capsys.readouterr().err


def test_doctor_says_a_broken_driver_instead_of_no_gpu(monkeypatch):
    from edgemm import doctor
    _broken_cuda(monkeypatch)
    text = doctor.report(doctor.facts(llama=False))
    gpu = [ln for ln in text.splitlines() if ln.startswith("gpu:")]
    assert gpu == ["gpu:          CUDA present but unusable (CUDA driver version is insufficient for CUDA runtime "
                   "version): running on the CPU"]


@pytest.fixture(scope="module")
def onnx_bundle(tmp_path_factory, random_ckpt):
    from edgemm.export.onnx import export_onnx
    out = tmp_path_factory.mktemp("fb") / "tiny"
    export_onnx(model=str(random_ckpt), out=out, precision="fp32", threads=2, log=None)
    return out


def test_serve_parallel_says_when_slots_decode_one_after_another(onnx_bundle, monkeypatch):
    """A bundle whose decoder_text has no batch dimension: `--parallel 2` says at start-up that its slots step one
    after another; the same bundle with the dimension says nothing of the kind."""
    from edgemm.runtimes.ort_backend import OrtBackend
    from edgemm.serve import load_models

    def load(parallel):
        lines = []
        ms = load_models(bundles=[str(onnx_bundle)], backend="ort", threads=1, parallel=parallel, log=lines.append)
        for m in ms.values():
            m.engine.close()
        return [ln for ln in lines if "one after another" in ln]
    assert load(2) == []                                   # batched: one run steps both slots
    real = OrtBackend.open.__func__

    def unbatched(cls, *a, **kw):                          # as a gated-cross-attention bundle opens
        b = real(cls, *a, **kw)
        b.batched = False
        return b
    monkeypatch.setattr(OrtBackend, "open", classmethod(unbatched))
    said = load(2)
    assert said == ["note: tiny: the 2 slots decode one after another, not in one batched step (the bundle's "
                    "decoder_text has no batch dimension (exported without one: gated cross-attention, or the "
                    "dense MoE form)): they answer concurrently, not faster in total"]
    assert load(1) == []                                   # one slot: nothing to batch


@requires_demo
@pytest.mark.skipif(not HAVE_LLAMA, reason="llama-cpp-python is not installed (pip install 'edgemm[gguf]')")
def test_gguf_validation_image_noise_is_said_and_recorded(tmp_path, monkeypatch):
    """The shapes scene failing to render: the GGUF check runs on seeded noise, says so in one line, and the
    manifest's validation record names the image it used."""
    from edgemm import shapes
    from edgemm.bundle import read_manifest
    from edgemm.export.gguf import export_gguf

    def broken(*a, **kw):
        raise RuntimeError("no fonts here")
    monkeypatch.setattr(shapes, "render", broken)
    lines = []
    export_gguf(model="tiny-shapes", out=tmp_path / "g", precision={"vision": "f32", "decoder": "f32"},
                log=lines.append)
    said = [ln for ln in lines if "validation image" in ln and "noise" in ln]
    assert said == ["note: the GGUF validation image is seeded noise (the shapes scene did not render: RuntimeError: "
                    "no fonts here): llama.cpp is checked against the reference on noise, not on a scene"]
    v = read_manifest(tmp_path / "g")["validation"]
    assert v["validation_image"].startswith("seeded noise (the shapes scene did not render")


def test_gguf_validation_image_names_the_scene():
    from edgemm.config import get_preset
    from edgemm.export.gguf_validate import validation_image_source
    cfg = get_preset("tiny-shapes")
    img, what = validation_image_source(cfg)
    assert what == "a shapes test scene" and img.shape[:2] == (cfg.vision.image_size,) * 2
    cfg.vision.image_size += 16
    img, what = validation_image_source(cfg)
    assert what.startswith("seeded noise (the vision tower takes") and img.shape[:2] == (cfg.vision.image_size,) * 2
