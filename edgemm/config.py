"""Model configs: plain dataclasses with named presets looked up by exact name."""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from . import tilings
from .blocks import spec as block_spec
from .blocks import support
from .blocks.kinds.cross import image_ids as cross_image_ids  # noqa: F401 (edgemm.config's public name)
from .errors import EdgemmError, UnsupportedVariant


@dataclass
class _VisionCore:
    """The vision stage: EVA-style ViT by default (patch conv, CLS appended after the patches, post-norm blocks).
    `arch` picks the tower kind (edgemm.blocks.registry); each kind's own fields are declared in its spec
    (edgemm/blocks/kinds/), each tiling's in its module (edgemm.tilings.fields)."""
    image_size: int = 48
    patch_size: int = 16
    width: int = 128
    layers: int = 3
    heads: int = 4
    mlp_dim: int = 256
    eps: float = 1e-6
    gelu: str = "tanh"                      # "tanh" (ggml_gelu), "erf", or "quick" (CLIP's x*sigmoid(1.702x))
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    arch: str = "eva"                       # the tower kind: eva, clip, siglip, none (Libra's image tokens), ...
    tiling: str = ""                        # a tiling of edgemm.tilings.MODULES ("": none, or grid_pinpoints' anyres)
    # Video input (edgemm.video): {"frames": clips are sampled to this many frames uniformly, "pool": stride of
    # LLaVA-NeXT-Video's spatial pooling of each frame's patch grid, "pool_mode": average | max; Qwen2-VL's
    # "temporal": frames a temporal patch, edgemm.qwen2vl_pixels.clip_pixels for the rest}; empty: no video
    video: dict = field(default_factory=dict)
    # pad_square: the image padded to a square with the mean colour before resizing (Libra's Expand2Square,
    # LLaVA-1.5's image_aspect_ratio "pad"); resample: PIL's filter of the one resize to image_size (3 bicubic;
    # Gemma 3: 2)
    pad_square: bool = False
    resample: int = 3

    @property
    def n_patches(self) -> int:
        """The tower's rows for one image (for one window with Monkey's `window`)."""
        return ((getattr(self, "window", 0) or self.image_size) // self.patch_size) ** 2

    @property
    def tower_passes(self) -> int:
        """Tiles one image sends through the tower: Monkey's windows + its global view, else 1."""
        w = getattr(self, "window", 0)
        return (self.image_size // w) ** 2 + 1 if w else 1


@dataclass
class _AdapterCore:
    """The connector: `kind` picks it (edgemm.blocks.registry); each kind's own fields are declared in its spec
    (edgemm/blocks/kinds/). The default, edgemm's GLU adapter: linear_proj -> LayerNorm -> GELU ->
    down(silu(gate(h)) * up(h)), boi/eoi rows."""
    kind: str = "glu"
    ffn_dim: int = 512
    eps: float = 1e-5
    gelu: str = "tanh"
    bias: bool = True                       # biases of the projector's linears (mlp, linear, qformer's projection)


@dataclass
class _DecoderCore:
    """LLaMA-style decoder with a text and a vision branch per layer. The option groups of its layers (routed
    variants, mixture of experts, gated cross-attention, Qwen3, Persimmon, Gemma 3) declare their fields in their
    specs (edgemm/blocks/kinds/)."""
    vocab_size: int = 512
    d_model: int = 256
    n_layers: int = 3
    n_heads: int = 4
    n_kv_heads: int | None = None           # None: multi-head attention; fewer: grouped-query attention
    ffn_dim: int = 512
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    max_seq_len: int = 512
    tie_embeddings: bool = False
    qkv_bias: bool = False                  # QKV bias per branch (CogVLM vision expert)
    position_rule: str = "sequential"       # "sequential" | "cogvlm" (all patches share one position)
    eoi_branch: str = "vision"              # "vision" | "text" (CogVLM's original routing)
    single_branch: bool = False             # LLaVA: one set of weights; image rows use the text branch

    @property
    def head_dim(self) -> int:
        return self.attn_head_dim or self.d_model // self.n_heads

    @property
    def attn_width(self) -> int:
        """Q rows and the attention output's width: n_heads * head_dim (d_model unless attn_head_dim says)."""
        return self.n_heads * self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def is_moe_layer(self, i: int) -> bool:
        return self.n_experts > 0 and (i + 1) % self.moe_every == 0 and i not in self.moe_dense_layers

    @property
    def moe_ffn_dim(self) -> int:
        return self.expert_ffn_dim or self.ffn_dim

    def ffn_params(self) -> tuple[int, int]:
        """FFN parameters of the whole decoder (one branch): (stored, read by one decode step). An MoE layer
        stores every expert and the router; a decode step reads the router and its top-k experts only."""
        stored = read = 0
        for i in range(self.n_layers):
            if self.is_moe_layer(i):
                one = 3 * self.d_model * self.moe_ffn_dim
                stored += self.n_experts * (one + self.d_model)
                read += self.experts_top_k * one + self.n_experts * self.d_model
            else:
                stored += 3 * self.d_model * self.ffn_dim
                read += 3 * self.d_model * self.ffn_dim
        return stored, read

    @property
    def cache_heads(self) -> int:
        """KV-cache heads per layer: with Libra's bridge, K for text queries then K for vision queries."""
        return self.kv_heads * (2 if self.cross_modal_bridge else 1)


def _section(name: str, core: type, section: str, extra: dict | None = None) -> type:
    """A config section's dataclass: the core fields, then every block spec's own fields (edgemm.blocks.spec)."""
    core_names = {f.name for f in dataclasses.fields(core)}
    added = [(k, object, field(default_factory=lambda d=d: copy.deepcopy(d)) if isinstance(d, (list, dict))
              else field(default=d)) for k, d in block_spec.section_fields(section, core_names, extra).items()]
    cls = dataclasses.make_dataclass(name, added, bases=(core,))
    cls.__module__, cls.__qualname__, cls.__doc__ = __name__, name, core.__doc__     # pickles as edgemm.config.<name>
    return cls


VisionConfig = _section("VisionConfig", _VisionCore, "vision", tilings.fields())
AdapterConfig = _section("AdapterConfig", _AdapterCore, "adapter")
DecoderConfig = _section("DecoderConfig", _DecoderCore, "decoder")


@dataclass
class TokenConfig:
    """The special tokens of an imported model's tokenizer, read from its source files by the importer
    (edgemm.importers.tokenizer). Empty (no eos) for edgemm's own models: edgemm.tokenizer.Tokenizer then looks up
    <s>, </s> and <pad> by name."""
    bos: int | None = None          # the template's bos_token; None: the tokenizer has none (Qwen)
    add_bos: bool = False           # every prompt starts with bos (the tokenizer prepends it: LLaMA, Gemma, Mistral)
    eos: list = field(default_factory=list)   # generation stops on any; the first closes a turn
    pad: int | None = None          # None: padding takes the first eos (padded rows are masked)
    stop: list = field(default_factory=list)    # stop strings of the release's chat format (Yi-VL's "###")


@dataclass
class ModelConfig:
    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    tokens: TokenConfig = field(default_factory=TokenConfig)

    @property
    def n_image_rows(self) -> int:
        """Rows the vision stage emits: boi + patches + eoi (LLaVA: the patches, + CLS when kept). With
        any-resolution tiling the count depends on the image (image_rows_for); this is the most one image takes."""
        tiles = tilings.of(self.vision)                     # tiled: the most rows one image takes (markers included)
        if tiles is not None:
            return tiles.max_rows(self)
        rows = block_spec.get("connector", self.adapter.kind).rows
        return rows(self) if rows else self.vision.n_patches + 2

    def image_rows_for(self, width: int, height: int, max_tiles="config") -> int:
        """Image rows for an image of width x height pixels (max_tiles: the config's unless given)."""
        tiles = tilings.of(self.vision)
        if tiles is None:
            return self.n_image_rows
        return tiles.image_rows(self, width, height, *(() if max_tiles == "config" else (max_tiles,)))

    @property
    def reads_question(self) -> bool:
        """InstructBLIP, LLaMA-VID: the vision stage reads the question too (its Q-Former tokenizer's ids). A plain
        config check, so the runtime path of other models never imports edgemm.qformer (and torch)."""
        return self.adapter.kind in ("qformer", "llamavid") and bool(self.adapter.qformer_text)

    @property
    def input_stage(self) -> str:
        """The bundle stage that makes image rows: `vision` (pixels) or, for Libra, `image_tokens`."""
        return "image_tokens" if self.adapter.kind == "libra" and self.vision.arch == "none" else "vision"

    @property
    def video_stage(self) -> bool:
        """A bundle's `video` stage (edgemm.model.encode_video), beside the stages below: LLaVA-NeXT-Video's (frames
        [F, 3, S, S] -> rows [1, F * R, D], the patch grid pooled between the tower and the connector), Qwen2-VL's
        (frames [F, 3, h, w] -> rows [1, F / T * R, D], T frames a temporal patch)."""
        v = self.vision.video
        return bool(v.get("pool")) and not v.get("project_first") and "frame" not in v or bool(v.get("temporal"))

    @property
    def stages(self) -> tuple[str, str, str]:
        if self.decoder.cross_attn_every:     # image rows -> per-layer cross K/V, once per image (edgemm.xattn)
            return self.input_stage, "cross_kv", "decoder_text"
        return self.input_stage, "decoder_text", "decoder_image"

    def variants(self) -> list[str]:
        """Names of the non-default features this config uses (the support matrix, edgemm.blocks.support)."""
        return support.variants(self)

    def validate(self) -> "ModelConfig":
        """The core checks here; each kind's own in its spec (edgemm.blocks.spec.check), each tiling's in its module."""
        d, v = self.decoder, self.vision
        if d.d_model % d.n_heads and not d.attn_head_dim:
            raise EdgemmError(f"d_model {d.d_model} is not divisible by n_heads {d.n_heads}")
        if d.n_heads % d.kv_heads:
            raise EdgemmError(f"n_heads {d.n_heads} is not a multiple of n_kv_heads {d.kv_heads}")
        tower = block_spec.get("vision", v.arch)            # (a tower whose patch conv drops the remainder: SigLIP)
        if v.image_size % v.patch_size and not (tower is not None and tower.partial_patches):
            raise EdgemmError(f"image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        if v.width % v.heads:
            raise EdgemmError(f"vision width {v.width} is not divisible by heads {v.heads}")
        for g in (v.gelu, self.adapter.gelu):
            if g not in ("tanh", "erf", "quick"):
                raise EdgemmError(f"gelu must be 'tanh', 'erf' or 'quick', not {g!r}")
        for role, kind in (("vision", v.arch), ("connector", self.adapter.kind)):
            if block_spec.get(role, kind) is None:
                what = "vision arch" if role == "vision" else "adapter kind"
                raise EdgemmError(f"unknown {what} {kind!r} (known: {', '.join(block_spec.kinds(role))})")
        if v.tiling and v.tiling not in tilings.MODULES:
            raise EdgemmError(f"unknown tiling {v.tiling!r} ({', '.join(tilings.MODULES)})")
        if v.window and v.arch != "qwen":
            raise EdgemmError("vision window (Monkey) goes with the qwen tower, image_size a multiple of window, window "
                              "a multiple of patch_size and window_lora [attention rank, MLP rank]")
        if v.second and v.arch != "clip+dinov2":
            raise EdgemmError("vision arch 'clip+dinov2' (OmniFusion's merged encoders) goes with vision.second (the "
                              "DINOv2 tower: width, layers, heads, mlp_dim) and the omni_mlp adapter")
        tiles = tilings.of(v)
        if tiles is not None:
            tiles.check_config(self)
        block_spec.check(self)
        if d.position_rule not in ("sequential", "cogvlm"):
            raise EdgemmError(f"unknown position_rule {d.position_rule!r}")
        if d.eoi_branch not in ("vision", "text"):
            raise EdgemmError(f"unknown eoi_branch {d.eoi_branch!r}")
        return self

    # ---- (de)serialisation -------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        try:
            vis = dict(d.get("vision", {}))
            for k in ("image_mean", "image_std"):
                if k in vis:
                    vis[k] = tuple(vis[k])
            return cls(name=d.get("name", "custom"), vision=VisionConfig(**vis),
                       adapter=AdapterConfig(**d.get("adapter", {})),
                       decoder=DecoderConfig(**d.get("decoder", {})),
                       tokens=TokenConfig(**d.get("tokens", {}))).validate()
        except TypeError as e:
            raise EdgemmError(f"invalid model config: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as e:
            raise EdgemmError(f"{path} is not valid JSON ({e}); re-export or re-save the model") from None


def cross_gates(ids, active: bool, reset: int | None) -> tuple[list, bool]:
    """Gated cross-attention (edgemm.xattn): whether each token of ids reads the current image -> (per token,
    whether the next token does); a token after `reset` (Idefics: </s>) reads no image until the next one."""
    out = []
    for t in ids:
        out.append(active)
        if reset is not None and int(t) == reset:
            active = False
    return out, active


def check_reference_supports(cfg: ModelConfig) -> None:
    v = support.refusal(cfg, "torch")
    if v is not None:
        raise UnsupportedVariant(v, "the reference model (edgemm.model)")


PRESETS: dict[str, ModelConfig] = {
    # The embedded demo model; trained weights ship in edgemm/data/tiny-shapes.
    # Its ViT is wider than the dataclass default (256 vs 128): the tower sees 10 rows per image, so width costs
    # little, and the wider tower binds colour, shape and cell in each row (measured in the issue-2 note).
    "tiny-shapes": ModelConfig(name="tiny-shapes", vision=VisionConfig(width=256, mlp_dim=512)),
    # tiny-shapes' weights with activation outliers put in at load time by an exact reparametrisation (edgemm.outliers)
    "tiny-shapes-outliers": ModelConfig(name="tiny-shapes-outliers", vision=VisionConfig(width=256, mlp_dim=512)),
    # ~0.5B random-weight model for speed work (text branch ~0.25B read per decode step).
    "bench-0.5b": ModelConfig(
        name="bench-0.5b",
        vision=VisionConfig(image_size=224, patch_size=14, width=768, layers=6, heads=12, mlp_dim=3072),
        adapter=AdapterConfig(ffn_dim=2816),
        decoder=DecoderConfig(vocab_size=512, d_model=1024, n_layers=16, n_heads=16, ffn_dim=2816,
                              max_seq_len=4096)),
    # Shapes of THUDM/cogvlm-chat-hf (EVA2-CLIP-E + Vicuna-7B with visual experts), for info and size estimates.
    "cogvlm-17b": ModelConfig(
        name="cogvlm-17b",
        vision=VisionConfig(image_size=490, patch_size=14, width=1792, layers=63, heads=16, mlp_dim=15360,
                            gelu="erf", image_mean=(0.48145466, 0.4578275, 0.40821073),
                            image_std=(0.26862954, 0.26130258, 0.27577711)),
        adapter=AdapterConfig(ffn_dim=11008, gelu="erf"),
        decoder=DecoderConfig(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, ffn_dim=11008,
                              max_seq_len=4096, position_rule="cogvlm", eoi_branch="text")),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise EdgemmError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return ModelConfig.from_dict(PRESETS[name].to_dict())
