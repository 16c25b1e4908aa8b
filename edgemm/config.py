"""Model configs: plain dataclasses with named presets looked up by exact name."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .blocks import support
from .errors import EdgemmError, UnsupportedVariant


@dataclass
class VisionConfig:
    """EVA-style ViT: patch conv, CLS appended after the patches, post-norm blocks."""
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
    # Imported families (edgemm.importers): "eva" is the default above; "clip" is a LLaVA-style CLIP tower
    # (CLS first, pre-LayerNorm, pre-norm blocks); "none": no pixel tower (Libra: image rows come from its
    # VQ image tokenizer; image_size/patch_size then give the token grid, n_patches = (image_size/patch_size)^2).
    arch: str = "eva"
    feature_layer: int | None = None        # clip: blocks run before the features are taken (None: all)
    keep_cls: bool = False                  # clip: LLaVA's "full" feature strategy keeps the CLS row
    # "siglip" (SigLIP: patch bias, no CLS, no pre-LayerNorm; edgemm.blocks.vision.SiglipVisionTower): post_norm
    # applies its post_layernorm (the last_hidden_state; only when every block runs)
    post_norm: bool = False
    # Any-resolution tiling (LLaVA-NeXT, edgemm.anyres): [h, w] pairs (multiples of image_size) the image may be
    # tiled to; empty: one fixed-size image. max_tiles: the most grid tiles (the overview is always added; None:
    # any pinpoint), a budget knob that departs from the source model when it excludes pinpoints.
    grid_pinpoints: list = field(default_factory=list)
    max_tiles: int | None = None
    # LLaVA-OneVision's vision_aspect_ratio "anyres_max_N": the unpadded feature map is downscaled (bilinear) when it
    # exceeds N tiles' worth (edgemm.anyres); None: never (LLaVA-NeXT)
    anyres_max: int | None = None
    # Video input (edgemm.video): {"frames": clips are sampled to this many frames uniformly, "pool": stride of
    # LLaVA-NeXT-Video's spatial pooling of each frame's patch grid, "pool_mode": average | max}; empty: no video
    video: dict = field(default_factory=dict)
    # InternViT (arch "internvit", InternVL; edgemm.blocks.internvit): pre-norm blocks with LayerScale, LayerNorm or
    # RMSNorm (norm "layer" | "rms"), q/k/v biases (qkv_bias), an RMSNorm over all of q and of k (qk_norm), a
    # LayerNorm after the last block (final_norm: transformers' use_mean_pooling false at vision_feature_layer -1).
    norm: str = "layer"
    qkv_bias: bool = True
    qk_norm: bool = False
    final_norm: bool = False
    # Dynamic tiles (InternVL, edgemm.internvl_tiles): tiling "internvl": the image resized to the grid of
    # image_size tiles (min_tiles..max_tiles of them) closest to its aspect ratio, + a thumbnail when more than one.
    tiling: str = ""
    min_tiles: int = 1
    # Tile grid (Idefics3 / SmolVLM, edgemm.smolvlm_tiles): tiling "smolvlm": the image resized to longest_edge, then
    # to multiples of image_size, cut into image_size tiles + the whole image at image_size (image_splitting; else
    # the whole image alone); tile_text: the token ids of the processor's text between the tiles' <image> runs
    # ("tile": per grid cell row-major over tile_text["grid"]^2, "global_split", "global", "end").
    longest_edge: int = 0
    image_splitting: bool = True
    tile_text: dict = field(default_factory=dict)
    # Libra's image tokenizer (arch "libra_vq", edgemm.blocks.libra_vq): the clip fields above are its CLIP tower;
    # {"feature_layers": CLIP hidden-state indices whose rows are concatenated (its select_layer), "embed_dim":
    # quant_conv's width}; pad_square: the image padded to a square with the mean colour before resizing (Libra's
    # Expand2Square, LLaVA-1.5's image_aspect_ratio "pad")
    tokenizer: dict = field(default_factory=dict)
    pad_square: bool = False
    # DINOv2 (arch "dinov2", edgemm.blocks.dinov2): register tokens after CLS (Dinov2WithRegisters; 0: none); final_norm
    # above is its layernorm. OmniFusion's merged encoders (arch "clip+dinov2"): this config is the CLIP tower and
    # `second` the DINOv2 tower's VisionConfig fields (same image_size / patch_size; its own image_mean / image_std)
    registers: int = 0
    second: dict = field(default_factory=dict)
    # Fuyu (arch "patch_linear", tiling "fuyu", edgemm.fuyu_patches): no tower, raw patch_size x patch_size patches
    # through one Linear; any image size (downscaled, aspect kept, to fit canvas [height, width], then padded to
    # whole patches with pad_value, the processor's padding_value before rescaling)
    canvas: list = field(default_factory=list)
    pad_value: float = 1.0
    resample: int = 3                       # PIL's filter of the one resize to image_size (3 bicubic; Gemma 3: 2)

    # Monkey (arch "qwen", edgemm.blocks.resampler): the image cut into window x window px tiles, each through the
    # tower with its own LoRA (ranks window_lora: [qkv and out proj, MLP-side residual]), + the whole image resized
    # to one window (the base tower); 0: one image of image_size
    window: int = 0
    window_lora: list = field(default_factory=list)

    @property
    def n_patches(self) -> int:
        """The tower's rows for one image (for one window with `window`)."""
        return ((self.window or self.image_size) // self.patch_size) ** 2

    @property
    def tower_passes(self) -> int:
        """Tiles one image sends through the tower: Monkey's windows + its global view, else 1."""
        return (self.image_size // self.window) ** 2 + 1 if self.window else 1


@dataclass
class AdapterConfig:
    """GLU adapter: linear_proj -> LayerNorm -> GELU -> down(silu(gate(h)) * up(h))."""
    ffn_dim: int = 512
    eps: float = 1e-5
    gelu: str = "tanh"
    # "glu" (above; boi/eoi rows), "mlp" (LLaVA: linear_1 -> GELU -> linear_2, no boi/eoi; "linear": LLaVA v1's one
    # Linear; "mlp_norm": Yi-VL's linear_1 -> LayerNorm -> GELU -> linear_2 -> LayerNorm, LayerNorm eps `eps`) or
    # "libra" (Libra's image-token input: per-codebook embeddings + the continuous signal, boi/eoi are tokens)
    kind: str = "glu"
    bias: bool = True                       # mlp: biases of linear_1/linear_2
    codebooks: int = 0                      # libra: vision_codebook_num
    vision_vocab: int = 0                   # libra: vision_vocab_size (per codebook)
    signal_size: int = 0                    # libra: contiguous_signal_size (0: none)
    concat_signals: bool = True             # libra: processor over concat(token embeddings, signal)
    norm_signals: bool = True               # libra: RMSNorm before the processor (concat mode)
    position_embedding: int = 0             # libra: rows of vision_position_embedding (0: none)
    # "perceiver" (Idefics' Perceiver resampler, edgemm.xattn; goes with the decoder's gated cross-attention)
    perceiver_latents: int = 0
    perceiver_depth: int = 0
    perceiver_heads: int = 0
    perceiver_head_dim: int = 0
    perceiver_qk_norms: bool = False        # LayerNorm of q and k per head
    perceiver_ffn: int = 0                  # ReLU MLP width (0: 4 * vision width)
    # "qformer" (BLIP-2 / InstructBLIP, edgemm.qformer): query_tokens learned queries through a Q-Former of
    # qformer_layers BERT-style layers (cross-attention to the tower rows every cross_attention_frequency layers;
    # LayerNorm eps `eps`, activation `gelu`), then a projection to d_model (bias: `bias`); qformer_text:
    # InstructBLIP's instruction tokens (vocab qformer_vocab, qformer_positions position rows) join the queries
    query_tokens: int = 0
    qformer_width: int = 0
    qformer_layers: int = 0
    qformer_heads: int = 0
    qformer_ffn: int = 0
    cross_attention_frequency: int = 1
    qformer_text: bool = False
    qformer_vocab: int = 0
    qformer_positions: int = 0
    resampler_heads: int = 0                # "resampler" (Qwen-VL, edgemm.blocks.resampler): query_tokens queries, one
                                            # cross-attention of resampler_heads heads (the release: output_dim // 128)
    attn_heads: int = 4                     # omni_transformer (OmniFusion, edgemm.blocks.omnifusion): its heads
    image_newline: bool = False             # mlp: LLaVA-NeXT's newline row `adapter.image_newline` [d_model]
    downsample_ratio: float = 0.5           # pixel_shuffle (InternVL): each side of a tile's feature map scaled by it
    # pixel_shuffle_linear (Idefics3 / SmolVLM): the token ids whose embedding rows the connector holds (`markers`)
    marker_ids: list = field(default_factory=list)
    pool_tokens: int = 0                    # gemma3: the rows the patch grid is average-pooled to (mm_tokens_per_image)


@dataclass
class DecoderConfig:
    """LLaMA-style decoder with a text and a vision branch per layer."""
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
    # Variants that real checkpoints use (edgemm.blocks.support names each).
    qkv_bias: bool = False                  # QKV bias per branch (CogVLM vision expert)
    position_rule: str = "sequential"       # "sequential" | "cogvlm" (all patches share one position)
    eoi_branch: str = "vision"              # "vision" | "text" (CogVLM's original routing)
    vision_rank: int | None = None          # Libra: low-rank vision branches
    per_modality_norms: bool = False        # Libra / mPLUG-Owl2
    cross_modal_bridge: int | None = None   # Libra: rank of the cross-modal K/V bridge
    per_modality_kv: bool = False           # mPLUG-Owl2: only K/V are per modality
    vision_down_ratio: int | None = None    # Libra: low-rank vision branches of rank out_features // ratio
    single_branch: bool = False             # LLaVA: one set of weights; image rows use the text branch
    vision_delta_rank: int | None = None    # XComposer2's Partial-LoRA: image rows see W0 + B A (rank r), text W0
    # Gated cross-attention (Flamingo / Idefics, edgemm.xattn): a tanh-gated cross-attention layer before decoder
    # layer i when i % cross_attn_every == 0 reads the current image's resampled rows (width cross_attn_kv_dim);
    # an image segment is its cross_attn_image_token (wrapped in cross_attn_image_wrap tokens, Idefics'
    # <fake_token_around_image>) through the text path; after cross_attn_reset_token a token reads no image until
    # the next one.
    cross_attn_every: int = 0               # 0: none
    cross_attn_kv_dim: int = 0              # 0: d_model
    cross_attn_qk_norms: bool = False       # RMSNorm of q and k per head (Idefics' qk_layer_norms)
    cross_attn_alpha: str = "float"         # "float" | "vector" gates
    cross_attn_image_token: int | None = None
    cross_attn_image_wrap: int | None = None
    cross_attn_reset_token: int | None = None
    # Mixture of experts (MoE-LLaVA: Mixtral / Qwen3-MoE language models), edgemm.moe. A layer i is an MoE layer
    # when n_experts > 0, (i + 1) % moe_every == 0 (Qwen3-MoE's decoder_sparse_step) and i is not in
    # moe_dense_layers (its mlp_only_layers); the router's top-k softmax weights are renormalised to sum to one
    # when norm_topk_prob (Mixtral always; Qwen3-MoE by its flag).
    n_experts: int = 0                      # 0: dense SwiGLU MLPs
    experts_top_k: int = 2
    expert_ffn_dim: int | None = None       # None: ffn_dim
    moe_every: int = 1
    moe_dense_layers: list = field(default_factory=list)
    norm_topk_prob: bool = True
    qk_norm: bool = False                   # Qwen3: RMSNorm over each head's Q and K (before RoPE); single branch
    attn_head_dim: int = 0                  # 0: d_model // n_heads; else the heads' own width (Qwen3: 128 at 2048)
    # Persimmon (Fuyu's language model): LayerNorm with bias for every norm (norm "layer": attn/ffn, final and, with
    # qk_norm, the per-head Q/K norms), RoPE on the first rope_dims of each head (0: all; partial_rotary_factor),
    # a squared-ReLU MLP up -> relu(x)^2 -> down (mlp "relu2"), biases on the attention output and the MLP
    norm: str = "rms"
    rope_dims: int = 0
    mlp: str = "swiglu"
    linear_bias: bool = False
    # Gemma 3 (edgemm.families.gemma3; its (1 + w) RMSNorm weights are stored with the 1 added): embeddings times
    # embed_scale (0: none), post-attention / post-FFN norms (sandwich_norms), a GELU-tanh gated MLP (mlp "geglu"),
    # scores times query_scale^-1/2 (0: head_dim's), sliding-window attention of sliding_window rows on the layers in
    # sliding_layers (RoPE base rope_local_theta there; the others' positions divided by rope_linear_factor), image
    # rows seeing each other both ways (image_bidirectional: an image segment's rows between its boi and eoi rows)
    embed_scale: float = 0.0
    sandwich_norms: bool = False
    query_scale: float = 0.0
    sliding_window: int = 0
    sliding_layers: list = field(default_factory=list)
    rope_local_theta: float = 10000.0
    rope_linear_factor: float = 1.0
    image_bidirectional: bool = False

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
        from . import tilings
        tiles = tilings.of(self.vision)                     # tiled: the most rows one image takes (markers included)
        if tiles is not None:
            return tiles.max_rows(self)
        if self.adapter.kind == "qformer":                  # BLIP-2: the learned queries
            return self.adapter.query_tokens
        if self.adapter.kind == "resampler":                # Qwen-VL: the learned queries (Monkey: per tile)
            return self.adapter.query_tokens * self.vision.tower_passes
        if self.adapter.kind == "pixel_shuffle":            # InternVL without dynamic tiles: one tile's shuffled rows
            from .internvl_tiles import max_rows as shuffled_rows
            return shuffled_rows(self)
        if self.adapter.kind in ("mlp", "linear", "mlp_norm"):        # LLaVA's projectors: one row per tower row
            return self.vision.n_patches + (1 if self.vision.keep_cls else 0)
        if self.adapter.kind == "gemma3":                   # Gemma 3: boi, the pooled rows, eoi
            return self.adapter.pool_tokens + 2
        if self.decoder.cross_attn_every:                   # gated cross-attention: the image's own tokens
            return len(cross_image_ids(self.decoder))
        return self.vision.n_patches + 2

    def image_rows_for(self, width: int, height: int, max_tiles="config") -> int:
        """Image rows for an image of width x height pixels (max_tiles: the config's unless given)."""
        from . import tilings
        tiles = tilings.of(self.vision)
        if tiles is None:
            return self.n_image_rows
        return tiles.image_rows(self, width, height, *(() if max_tiles == "config" else (max_tiles,)))

    @property
    def reads_question(self) -> bool:
        """InstructBLIP: the vision stage reads the question too (its Q-Former tokenizer's ids). A plain config
        check, so the runtime path of other models never imports edgemm.qformer (and torch)."""
        return self.adapter.kind == "qformer" and bool(self.adapter.qformer_text)

    @property
    def input_stage(self) -> str:
        """The bundle stage that makes image rows: `vision` (pixels) or, for Libra, `image_tokens`."""
        return "image_tokens" if self.adapter.kind == "libra" and self.vision.arch == "none" else "vision"

    @property
    def stages(self) -> tuple[str, str, str]:
        if self.decoder.cross_attn_every:     # image rows -> per-layer cross K/V, once per image (edgemm.xattn)
            return self.input_stage, "cross_kv", "decoder_text"
        return self.input_stage, "decoder_text", "decoder_image"

    def variants(self) -> list[str]:
        """Names of the non-default features this config uses (the support matrix, edgemm.blocks.support)."""
        return support.variants(self)

    def validate(self) -> "ModelConfig":
        d, v = self.decoder, self.vision
        if d.d_model % d.n_heads and not d.attn_head_dim:
            raise EdgemmError(f"d_model {d.d_model} is not divisible by n_heads {d.n_heads}")
        if d.attn_head_dim and (d.attn_head_dim % 2 or d.cross_attn_every):
            raise EdgemmError(f"attn_head_dim {d.attn_head_dim}: must be even (RoPE) and goes without gated "
                              "cross-attention")
        if d.n_heads % d.kv_heads:
            raise EdgemmError(f"n_heads {d.n_heads} is not a multiple of n_kv_heads {d.kv_heads}")
        if v.image_size % v.patch_size:
            raise EdgemmError(f"image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        if v.window and (v.arch != "qwen" or v.image_size % v.window or v.window % v.patch_size
                         or len(v.window_lora) != 2):
            raise EdgemmError("vision window (Monkey) goes with the qwen tower, image_size a multiple of window, window "
                              "a multiple of patch_size and window_lora [attention rank, MLP rank]")
        if v.width % v.heads:
            raise EdgemmError(f"vision width {v.width} is not divisible by heads {v.heads}")
        for g in (v.gelu, self.adapter.gelu):
            if g not in ("tanh", "erf", "quick"):
                raise EdgemmError(f"gelu must be 'tanh', 'erf' or 'quick', not {g!r}")
        if v.arch not in ("eva", "clip", "none", "blip", "siglip", "internvit", "dinov2", "clip+dinov2", "qwen",
                          "libra_vq", "patch_linear"):
            raise EdgemmError(f"unknown vision arch {v.arch!r}")
        if v.post_norm and (v.arch != "siglip" or v.feature_layer not in (None, v.layers)):
            raise EdgemmError("vision post_norm goes with the siglip tower taking every layer (feature_layer None "
                              "or the tower's layers)")
        if self.adapter.kind not in ("glu", "mlp", "linear", "mlp_norm", "libra", "qformer", "perceiver", "pixel_shuffle",
                                     "pixel_shuffle_linear", "newline_rows", "resampler", "omni_mlp",
                                     "omni_transformer", "gemma3"):
            raise EdgemmError(f"unknown adapter kind {self.adapter.kind!r}")
        if (v.arch == "clip+dinov2") != bool(v.second) or (v.arch == "clip+dinov2" and (
                self.adapter.kind != "omni_mlp" or not {"width", "layers", "heads", "mlp_dim"} <= set(v.second))):
            raise EdgemmError("vision arch 'clip+dinov2' (OmniFusion's merged encoders) goes with vision.second (the "
                              "DINOv2 tower: width, layers, heads, mlp_dim) and the omni_mlp adapter")
        a_heads = self.adapter.attn_heads
        if self.adapter.kind == "omni_transformer" and (a_heads < 1 or v.width % a_heads):
            raise EdgemmError("the omni_transformer adapter needs attn_heads >= 1 dividing the vision width")
        a = self.adapter
        if a.kind == "resampler" and not (a.resampler_heads >= 1 and d.d_model % a.resampler_heads == 0
                                          and a.query_tokens >= 1 and math.isqrt(a.query_tokens) ** 2 == a.query_tokens):
            raise EdgemmError("a resampler adapter needs query_tokens a square (a query grid) and resampler_heads >= 1 "
                              "dividing d_model")
        if self.adapter.kind == "qformer":
            a = self.adapter
            if min(a.query_tokens, a.qformer_width, a.qformer_layers, a.qformer_heads, a.qformer_ffn,
                   a.cross_attention_frequency) < 1 or a.qformer_width % a.qformer_heads:
                raise EdgemmError("a qformer adapter needs query_tokens, qformer_width (a multiple of qformer_heads), "
                                  "qformer_layers, qformer_heads, qformer_ffn and cross_attention_frequency >= 1")
            if a.qformer_text and min(a.qformer_vocab, a.qformer_positions) < 1:
                raise EdgemmError("qformer_text (InstructBLIP) needs qformer_vocab and qformer_positions >= 1")
        elif v.arch == "blip":
            raise EdgemmError("vision arch 'blip' (all tower rows, CLS included) goes with adapter kind 'qformer'")
        if (v.arch in ("none", "libra_vq")) != (self.adapter.kind == "libra"):
            raise EdgemmError("vision arch 'none' (image tokens) or 'libra_vq' (Libra's image tokenizer) goes with "
                              "adapter kind 'libra' (and only they do)")
        if d.single_branch and (d.vision_rank or d.vision_down_ratio or d.per_modality_norms
                                or d.cross_modal_bridge or d.eoi_branch != "vision"):
            raise EdgemmError("single_branch excludes the per-modality variants")
        if d.per_modality_kv and (not d.per_modality_norms or d.vision_rank or d.vision_down_ratio
                                  or d.cross_modal_bridge or d.single_branch):
            raise EdgemmError("per_modality_kv (mPLUG-Owl2's modality-adaptive module) goes with per_modality_norms "
                              "and excludes low-rank branches, the bridge and single_branch")
        if d.vision_delta_rank and (d.vision_delta_rank < 1 or d.single_branch or d.vision_rank or d.vision_down_ratio
                                    or d.per_modality_kv or d.cross_modal_bridge):
            raise EdgemmError("vision_delta_rank (XComposer2's Partial-LoRA) is a rank >= 1 and excludes single_branch, "
                              "low-rank branches, per-modality K/V and the bridge")
        if v.arch == "libra_vq":              # Libra's image tokenizer (edgemm.blocks.libra_vq)
            t, a, n = v.tokenizer, self.adapter, v.layers
            fl = t.get("feature_layers")
            if not (a.kind == "libra" and isinstance(fl, list) and fl and all(
                    isinstance(i, int) and -n - 1 <= i <= n for i in fl) and isinstance(t.get("embed_dim"), int)
                    and t["embed_dim"] >= 1 and a.codebooks >= 1 and a.vision_vocab > 3
                    and (a.vision_vocab - 2) & (a.vision_vocab - 3) == 0 and a.signal_size == v.width * len(fl)):
                raise EdgemmError("the libra_vq tower goes with the libra adapter, tokenizer feature_layers (CLIP "
                                  "hidden-state indices) and embed_dim, a codebook of 2^b codes (vision_vocab 2^b + 2) "
                                  "and signal_size = width x the number of feature layers")
        if d.qk_norm and not d.single_branch:
            raise EdgemmError("qk_norm (Qwen3's per-head Q/K RMSNorm) goes with single_branch")
        if d.n_experts and not (d.single_branch and 1 <= d.experts_top_k <= d.n_experts and d.moe_every >= 1):
            raise EdgemmError("mixture of experts needs single_branch (MoE-LLaVA; routed-expert + MoE models are not "
                              "supported) and 1 <= experts_top_k <= n_experts, moe_every >= 1")
        if self.adapter.kind == "pixel_shuffle_linear" or v.tiling == "smolvlm":
            from .smolvlm_tiles import check_config as check_smolvlm
            check_smolvlm(self)
        elif v.arch == "patch_linear" or self.adapter.kind == "newline_rows" or v.tiling == "fuyu":
            from .fuyu_patches import check_config as check_fuyu
            check_fuyu(self)
        elif v.arch == "internvit" or self.adapter.kind == "pixel_shuffle" or v.tiling:
            from .internvl_tiles import check_config as check_internvl
            check_internvl(self)
        if v.grid_pinpoints or self.adapter.image_newline:
            from .anyres import check_config
            check_config(self)
        if (d.cross_attn_every > 0) != (self.adapter.kind == "perceiver") or (d.cross_attn_every and not (
                d.single_branch and d.cross_attn_image_token is not None and d.cross_attn_alpha in ("float", "vector")
                and d.cross_attn_every <= d.n_layers and not d.n_kv_heads)):
            raise EdgemmError("gated cross-attention goes with the perceiver adapter (and only with it), "
                              "single_branch, multi-head attention, an image token, cross_attn_every <= n_layers "
                              "and float or vector gates")
        side = v.image_size // v.patch_size
        if a.kind == "gemma3" and not (a.pool_tokens >= 1 and math.isqrt(a.pool_tokens) ** 2 == a.pool_tokens
                                       and side % math.isqrt(a.pool_tokens) == 0):
            raise EdgemmError("the gemma3 projector needs pool_tokens a square whose side divides the patch grid's")
        if (d.sliding_window < 0 or any(not isinstance(i, int) or not 0 <= i < d.n_layers for i in d.sliding_layers)
                or (d.sliding_layers and not d.sliding_window) or d.rope_linear_factor <= 0):
            raise EdgemmError("sliding_layers are layer indices and need a sliding_window >= 1; rope_linear_factor "
                              "> 0")
        if d.norm not in ("rms", "layer") or d.mlp not in ("swiglu", "relu2", "geglu") or d.rope_dims % 2 \
                or d.rope_dims > d.head_dim or ("layer" == d.norm or d.mlp == "relu2" or d.linear_bias) and (
                    d.n_experts or d.cross_attn_every or not d.single_branch):
            raise EdgemmError("decoder norm is 'rms' or 'layer', mlp 'swiglu' or 'relu2', rope_dims even and at most "
                              "head_dim; LayerNorm, relu2 and linear biases (Persimmon) go with a single branch "
                              "without experts or cross-attention")
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


def cross_image_ids(d: DecoderConfig) -> list:
    """Gated cross-attention: the tokens an image segment feeds (Idefics' processor: fake, <image>, fake)."""
    w = [] if d.cross_attn_image_wrap is None else [d.cross_attn_image_wrap]
    return w + [d.cross_attn_image_token] + w


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
