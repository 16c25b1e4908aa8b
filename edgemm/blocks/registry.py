"""Registered blocks: role ("vision", "connector", "layer") x kind -> the block class.

    @register("connector", "mlp")
    class MlpProjector(nn.Module): ...

    get("connector", cfg.adapter.kind).from_config(cfg)     # what EdgeMM does

A block class gets `kind` set by the decorator (a class attribute). Towers and connectors have
`from_config(cfg: ModelConfig)`; layer kinds say how a decoder layer builds them (edgemm.blocks.decoder).
Registration happens when a block module is imported: load_all() imports those MODULES names (EdgeMM calls it).
No torch here.
"""
from __future__ import annotations

from ..errors import EdgemmError

ROLES = ("vision", "connector", "layer")
_BLOCKS: dict[str, dict[str, type]] = {r: {} for r in ROLES}
# The block modules (edgemm.blocks.<name>): a new block module adds its name here, nothing else imports it
MODULES = ("vision", "connectors", "layers", "moe", "cross", "qformer", "internvit", "dinov2", "omnifusion",
           "resampler", "libra_vq", "llamavid", "qwen2vl")


def load_all() -> None:
    """Import every block module, registering its blocks (EdgeMM does once; torch is imported here)."""
    import importlib
    for m in MODULES:
        importlib.import_module(f"edgemm.blocks.{m}")


def register(role: str, kind: str):
    """Class decorator: registers the class as the `kind` block of `role` and sets its `kind` attribute."""
    if role not in _BLOCKS:
        raise ValueError(f"unknown block role {role!r}; roles: {', '.join(ROLES)}")

    def deco(cls):
        have = _BLOCKS[role].get(kind)
        if have is not None and have is not cls:
            raise ValueError(f"block {role}:{kind} registered twice ({have.__qualname__}, {cls.__qualname__})")
        cls.kind = kind
        _BLOCKS[role][kind] = cls
        return cls
    return deco


def get(role: str, kind: str) -> type:
    """The block class registered as role:kind; an EdgemmError naming the registered kinds if there is none."""
    if role not in _BLOCKS:
        raise EdgemmError(f"unknown block role {role!r}; roles: {', '.join(ROLES)}")
    cls = _BLOCKS[role].get(kind)
    if cls is None:
        raise EdgemmError(f"no {role} block of kind {kind!r}; registered {role} kinds: "
                          f"{', '.join(kinds(role)) or 'none (no block module imported)'}")
    return cls


def kinds(role: str) -> list[str]:
    """The kinds registered for a role, sorted."""
    return sorted(_BLOCKS.get(role, {}))
