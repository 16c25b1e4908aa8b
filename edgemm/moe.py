"""The mixture-of-experts FFN: the block is edgemm.blocks.moe (this name stays importable)."""
from __future__ import annotations

from .blocks.moe import MoE

__all__ = ["MoE"]
