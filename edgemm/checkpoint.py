"""Checkpoint directories: config.json, model.safetensors, tokenizer.json, chat_template.jinja. Never pickle."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .config import ModelConfig, get_preset, PRESETS
from .errors import EdgemmError

DEMO_DIR = Path(__file__).parent / "data" / "tiny-shapes"
FILES = ("config.json", "model.safetensors", "tokenizer.json")


@contextlib.contextmanager
def atomic_dir(out: str | Path):
    """Yields a temporary sibling directory of `out`; on clean exit it replaces `out` (an old `out` is kept
    until the new one is in place), on error it is removed: nothing half-written is ever at `out`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial.", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)                                  # mkdtemp makes it private
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(model, tokenizer, out: str | Path, dtype=None) -> Path:
    """Write atomically: a temporary sibling directory renamed into place. dtype=torch.float16 stores the
    floating-point tensors in half precision (the shipped demo model); loading computes in fp32 regardless."""
    from safetensors.torch import save_file
    out = Path(out)
    with atomic_dir(out) as tmp:
        model.cfg.save(tmp / "config.json")
        state = {k: v.detach().to(dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous().cpu()
                 for k, v in model.state_dict().items()}
        if model.cfg.decoder.tie_embeddings:
            state.pop("decoder.lm_head.weight", None)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(tmp / "tokenizer.json")
        if getattr(tokenizer, "qformer", None) is not None:      # InstructBLIP (edgemm.qformer)
            from .qformer import QFORMER_TOKENIZER
            tokenizer.qformer.save(tmp / QFORMER_TOKENIZER)
        from .tokenizer import CHAT_TEMPLATE
        (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out


def resolve_model(spec: str | None) -> tuple[str, Path | None]:
    """--model value -> (kind, path): ('dir', path) for a checkpoint directory, ('preset', None) for a
    random-weight preset; 'tiny-shapes' (the default) resolves to the shipped trained weights."""
    spec = spec or "tiny-shapes"
    if spec == "tiny-shapes":
        if not (DEMO_DIR / "model.safetensors").exists():
            raise EdgemmError(f"the shipped tiny-shapes weights are missing from {DEMO_DIR}; "
                              "reinstall edgemm or train them with `edgemm train-demo`")
        return "dir", DEMO_DIR
    p = Path(spec)
    if p.is_dir():
        return "dir", p
    if spec in PRESETS:
        return "preset", None
    raise EdgemmError(f"--model {spec!r} is neither a checkpoint directory nor a preset "
                      f"({', '.join(PRESETS)})")


def load_checkpoint(path: str | Path, device="cpu"):
    """-> (model, tokenizer). Every failure is an EdgemmError naming the file and what to do."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from .model import EdgeMM
    from .tokenizer import Tokenizer
    path = Path(path)
    sharded = not (path / "model.safetensors").is_file() and (path / "model.safetensors.index.json").is_file()
    for f in FILES:
        if not (path / f).is_file() and not (sharded and f == "model.safetensors"):
            raise EdgemmError(f"{path} is not an edgemm checkpoint: {f} is missing")
    cfg = ModelConfig.load(path / "config.json")
    files = shard_files(path) if sharded else ["model.safetensors"]   # large checkpoints (edgemm import)
    state = {}
    from .safety import check_safetensors
    for f in files:
        if (path / f).is_file():
            check_safetensors(path / f)                  # bounded header checks before the library maps it
        try:
            state.update(load_file(str(path / f)))
        except (SafetensorError, OSError) as e:
            raise EdgemmError(f"{path / f} is missing or corrupt ({e}); re-download or re-save it") from None
    with torch.device("meta"):
        model = EdgeMM(cfg)
    if cfg.decoder.tie_embeddings:
        state.setdefault("decoder.lm_head.weight", state.get("decoder.tok_embeddings.weight"))
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise EdgemmError(f"{path / 'model.safetensors'} does not match config.json: "
                          f"missing {missing[:3]}, unexpected {extra[:3]}")
    for k, v in state.items():
        want = tuple(model.state_dict()[k].shape)
        if tuple(v.shape) != want:
            raise EdgemmError(f"tensor {k} has shape {tuple(v.shape)}, config.json expects {want}")
    # fp16-stored weights (the shipped demo model) are computed in fp32: the reference every export checks against
    state = {k: v.float() if v.dtype == torch.float16 else v for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    if cfg.decoder.tie_embeddings:
        model.decoder.lm_head.weight = model.decoder.tok_embeddings.weight
    tok = Tokenizer.load(path / "tokenizer.json", tokens=cfg.tokens)
    if cfg.adapter.qformer_text:                  # InstructBLIP: the Q-Former's own tokenizer (edgemm.qformer)
        from .qformer import attach_checkpoint_tokenizer
        attach_checkpoint_tokenizer(tok, path, cfg)
    return model.to(device).eval(), tok


def load_model(spec: str | None = None, device="cpu", seed: int = 0):
    """--model semantics (docs/architecture.md, Conventions): checkpoint dir, 'tiny-shapes' (shipped), or a random-weight preset."""
    kind, path = resolve_model(spec)
    if kind == "dir":
        return load_checkpoint(path, device)
    from .model import EdgeMM
    from .tokenizer import Tokenizer
    if spec == "tiny-shapes-outliers":                 # the shipped weights, reparametrised (edgemm.outliers)
        from .outliers import add_outliers
        m, tok = load_checkpoint(DEMO_DIR)
        add_outliers(m)
        m.cfg.name = spec
        return m.to(device).eval(), tok
    cfg = get_preset(spec)
    if spec == "cogvlm-17b":
        raise EdgemmError("cogvlm-17b is a shapes-only preset (about 17.6e9 parameters, 70 GB in fp32): "
                          "use it with `edgemm info`, or import real weights with `edgemm import`")
    model = EdgeMM(cfg).init_weights(seed).to(device).eval()
    return model, Tokenizer.load(DEMO_DIR / "tokenizer.json")


def chat_template_for(model) -> str:
    """The chat template a bundle of `model` carries: the checkpoint directory's own (an imported model's, from
    its tokenizer config), else edgemm's format. `model` is a --model spec or a (model, tokenizer) pair."""
    from .tokenizer import CHAT_TEMPLATE
    if isinstance(model, (str, Path)):
        try:
            kind, path = resolve_model(str(model))
        except EdgemmError:
            return CHAT_TEMPLATE
        f = Path(path) / "chat_template.jinja" if kind == "dir" else None
        if f is not None and f.is_file():
            return f.read_text()
    return CHAT_TEMPLATE


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def shard_files(path: Path) -> list[str]:
    """The weight files a sharded checkpoint's model.safetensors.index.json lists, sorted."""
    import json
    index = Path(path) / "model.safetensors.index.json"
    from .safety import bare_file_name
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
        raise EdgemmError(f"{path} has neither model.safetensors nor a valid {index.name} ({e})") from None
    return [bare_file_name(n, str(index)) for n in names]


def checkpoint_digest(path: str | Path) -> str:
    """The source digest of a checkpoint directory: sha256 of model.safetensors, or of a sharded checkpoint's
    index and every shard it lists ("sha256-shards:", each shard's name and sha256 by name)."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return "sha256:" + file_sha256(path / "model.safetensors")
    index = path / "model.safetensors.index.json"
    shards = shard_files(path)
    h = hashlib.sha256(file_sha256(index).encode())
    for f in shards:
        if not (path / f).is_file():
            raise EdgemmError(f"{path / f} is missing (listed by {index.name})")
        h.update(f"\n{f} {file_sha256(path / f)}".encode())
    return "sha256-shards:" + h.hexdigest()


# --------------------------------------------------------------------------- source model (export, calibration)
def state_digest(model) -> str:
    """sha256 over a model's state dict (names and bytes): the digest of an in-memory or preset model."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def load_source(model):
    """--model spec, or a (model, tokenizer) pair -> (model, tokenizer, source dict) as manifests record it."""
    if isinstance(model, tuple):
        m, tok = model
        return m.eval(), tok, {"model": getattr(m.cfg, "name", "in-memory"), "kind": "in-memory",
                               "digest": "sha256-state:" + state_digest(m)}
    kind, path = resolve_model(model)
    m, tok = load_model(model)
    if kind == "dir":
        return m, tok, {"model": str(Path(path).resolve()), "kind": "checkpoint",
                        "digest": checkpoint_digest(path)}
    return m, tok, {"model": model, "kind": "preset", "seed": 0, "digest": "sha256-state:" + state_digest(m)}


def model_config(spec: str | None) -> tuple[ModelConfig, str, Path | None]:
    """-> (config, where it came from, the checkpoint folder or None for a preset), without loading weights."""
    kind, path = resolve_model(spec)
    if kind == "dir":
        return ModelConfig.load(path / "config.json"), str(path), path
    return (get_preset(spec), {"cogvlm-17b": "preset cogvlm-17b (shapes only)", "tiny-shapes-outliers":
                               "preset tiny-shapes-outliers (the shipped weights with activation outliers)"}.get(
                                   spec, f"preset {spec} (random weights)"), None)
