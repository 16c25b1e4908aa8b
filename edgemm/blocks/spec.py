"""Block specs: what each block kind adds to a model config, kept beside the kind instead of in config.py.

A spec is declared in the kind's spec module (edgemm/blocks/kinds/<block module>.py: no torch, so a config loads
without it) and says, for one kind of one role:

    fields     its own config fields and their defaults (the section's dataclass is composed from the core fields
               and every spec's fields of that section: `ModelConfig.to_dict()` and old manifests are unchanged)
    check      validate(cfg): raises EdgemmError with one line when the config cannot be built
    rows       (connectors) the image rows one untiled image sends to the decoder
    params     (towers, connectors) its parameters, from the config alone (`edgemm info`)
    describe   (connectors) `edgemm info`'s `vision:` line, where the default line does not say what it does
    partial_patches  (towers) image_size need not be a multiple of patch_size (the patch conv drops the rest)

Roles and the config field that picks the kind: "vision" (vision.arch), "connector" (adapter.kind) and "decoder"
(option groups of the decoder's layers: each group's fields, and its check, which always runs). A tiling's fields
are its module's FIELDS (edgemm.tilings).

    from . import spec
    spec.declare("connector", "gemma3", fields={"pool_tokens": 0}, check=..., rows=lambda cfg: ...)
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

SECTIONS = {"vision": "vision", "connector": "adapter", "decoder": "decoder"}
# The spec modules (edgemm.blocks.kinds.<name>): a new block module's specs add a name here, nothing else
MODULES = ("vision", "connectors", "layers", "moe", "cross", "qformer", "internvit", "dinov2", "omnifusion",
           "resampler", "libra_vq", "decoder", "llamavid", "qwen2vl")


@dataclass(frozen=True)
class Spec:
    role: str
    kind: str
    fields: dict = field(default_factory=dict)
    check: Callable | None = None
    rows: Callable | None = None
    params: Callable | None = None
    describe: Callable | None = None
    partial_patches: bool = False       # (towers) an image_size that is not a multiple of patch_size is allowed: the
                                        # stride-p patch conv drops the remainder (SigLIP, as transformers' does)


_SPECS: dict[tuple[str, str], Spec] = {}
_loaded = False


def declare(role: str, kind: str, fields: dict | None = None, **hooks) -> Spec:
    if role not in SECTIONS:
        raise ValueError(f"unknown spec role {role!r}; roles: {', '.join(SECTIONS)}")
    if (role, kind) in _SPECS:
        raise ValueError(f"spec {role}:{kind} declared twice")
    s = _SPECS[role, kind] = Spec(role, kind, dict(fields or {}), **hooks)
    return s


def load_all() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for m in MODULES:
            importlib.import_module(f"edgemm.blocks.kinds.{m}")


def get(role: str, kind: str) -> Spec | None:
    load_all()
    return _SPECS.get((role, kind))


def of_role(role: str) -> list[Spec]:
    load_all()
    return [s for (r, _), s in _SPECS.items() if r == role]


def kinds(role: str) -> list[str]:
    return [s.kind for s in of_role(role)]


def section_fields(section: str, core: set, extra: dict | None = None) -> dict:
    """The fields every spec of a section adds (name -> default), in declaration order; a field two specs share
    (feature_layer, final_norm, query_tokens ...) must have one default, and none may shadow a core field."""
    out: dict = dict(extra or {})
    for s in (s for s in _all() if SECTIONS[s.role] == section):
        for k, d in s.fields.items():
            if k in core:
                raise ValueError(f"spec {s.role}:{s.kind} redeclares the core field {section}.{k}")
            if k in out and out[k] != d:
                raise ValueError(f"{section}.{k} declared with two defaults ({out[k]!r}, {d!r})")
            out[k] = d
    return out


def _all() -> list[Spec]:
    load_all()
    return list(_SPECS.values())


def check(cfg) -> None:
    """Every applicable spec's check: the tower's, the connector's and each decoder option group's."""
    for s in (get("vision", cfg.vision.arch), get("connector", cfg.adapter.kind), *of_role("decoder")):
        if s is not None and s.check is not None:
            s.check(cfg)
