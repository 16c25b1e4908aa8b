"""SmolVLM and Idefics3 (transformers' SmolVLMForConditionalGeneration, model_type "smolvlm", and
Idefics3ForConditionalGeneration, "idefics3": SmolVLM-256M/500M/2.2B, Idefics3-8B; a Llama-architecture language
model) -> edgemm.

- the vision tower (Idefics3VisionTransformer) as edgemm's SigLIP tower (edgemm.blocks.vision, arch "siglip"): every
  layer, then post_layernorm (the last_hidden_state the model takes). Its embeddings look a patch's position up by
  bucketing its fractional coordinates (NaViT-style, for padded images): a full tile, the only kind the processor
  makes (its tiles are all image_size x image_size, so patch_attention_mask is all ones), reads the rows the import
  gathers once into the tower's position table (the same torch.bucketize steps, so a float rounding that moves a
  bucket moves it here too);
- the connector (edgemm.blocks.connectors' pixel_shuffle_linear): pixel shuffle by scale_factor (the same steps as
  InternVL's), then modality_projection.proj (no bias); it also holds the token embedding rows of the text the
  processor writes between the tiles (edgemm.smolvlm_tiles);
- the language model as LLaVA's (edgemm.families.llava: decoder_config / decoder_plan);
- the processor: the Idefics3 image processor's tile grid (size / max_image_size longest edges, do_image_splitting,
  LANCZOS resizes, mean / std) from preprocessor_config.json, image_seq_len from processor_config.json, and the
  prompt expansion (<fake_token_around_image>, <row_i_col_j>, <global-img>, the <image> rows) tokenized with the
  checkpoint's tokenizer (edgemm.smolvlm_tiles.tile_text).
"""
from __future__ import annotations

from ..config import AdapterConfig, ModelConfig, VisionConfig
from ..errors import EdgemmError
from ..importers.shards import Source
from ..importers.tokenizer import _read_json
from ..tokenizer import IMAGE
from . import Family, register
from .base import Plan, _act, _req, _siglip_vision
from .idefics import _token
from .internvl import image_tokens as named_tokens
from .llava import decoder_config, decoder_plan, pick

TOKENS = {"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
          "global_image_token": "<global-img>"}
VISION_TYPES = ("smolvlm_vision", "idefics3_vision")
LANCZOS = 1                     # PIL's resample code, the processor's default (and every released checkpoint's)


def _json(src: Source, name: str) -> dict:
    return _read_json(src.path / name) or {}


def image_tokens(src: Source) -> dict:
    """The tokens the processor writes: tokenizer_config.json's fake/image/global image tokens (top level or in
    extra_special_tokens, as SmolVLMProcessor reads them off its tokenizer), else the processor's defaults."""
    out = named_tokens(src, TOKENS)         # (<global-img> may be plain text: tile_text tokenizes it as it comes)
    missing = [out[k] for k in ("fake_image_token", "image_token") if _token(src, out[k], required=False) is None]
    if missing:
        raise EdgemmError(f"{src.path / 'tokenizer.json'} lacks the token(s) {', '.join(missing)} that the "
                          "processor's prompts use")
    return out


def _processor(src: Source, v: VisionConfig, rows: int) -> None:
    """preprocessor_config.json (Idefics3 image processor) and processor_config.json -> the tile grid's settings."""
    p, w = _json(src, "preprocessor_config.json"), "preprocessor_config.json"
    tile = (p.get("max_image_size") or {}).get("longest_edge", v.image_size)
    if tile != v.image_size:
        raise EdgemmError(f"{w}: max_image_size {tile} differs from the tower's image_size {v.image_size}")
    if p.get("do_resize") is False or p.get("do_normalize") is False or p.get("do_rescale") is False or \
            abs(p.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-12 or p.get("resample", LANCZOS) != LANCZOS:
        raise EdgemmError(f"{w}: do_resize, do_rescale and do_normalize off, another rescale_factor or resample "
                          "are not supported")
    v.longest_edge = int((p.get("size") or {}).get("longest_edge", 4 * v.image_size))
    v.image_splitting = bool(p.get("do_image_splitting", True))
    v.image_mean = tuple(p.get("image_mean", (0.5, 0.5, 0.5)))
    v.image_std = tuple(p.get("image_std", (0.5, 0.5, 0.5)))
    seq = _json(src, "processor_config.json").get("image_seq_len")
    if seq not in (None, rows):
        raise EdgemmError(f"processor_config.json: image_seq_len {seq} differs from the {rows} rows a tile gives "
                          "((image_size / patch_size / scale_factor)^2)")


def _positions(t):
    """Idefics3VisionEmbeddings' position rows of a full tile: the table gathered at the bucketed ids."""
    import torch
    table = t[0]
    side = round(table.shape[0] ** 0.5)
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    coords = torch.clamp(torch.arange(side, dtype=torch.float32) * (1.0 / torch.tensor(float(side))), max=1 - 1e-6)
    b = torch.bucketize(coords, boundaries, right=True)
    return table[(b[:, None] * side + b[None, :]).reshape(-1)].unsqueeze(0)


def map_smolvlm(hf: dict, src: Source, rules: str = "original") -> Plan:
    """transformers' SmolVLM / Idefics3ForConditionalGeneration: SigLIP + pixel shuffle + Linear + a Llama LM."""
    w, wt, wv = "config.json", "config.json text_config", "config.json vision_config"
    tc, vc = _req(hf, "text_config", w), _req(hf, "vision_config", w)
    decoder = decoder_config(hf, tc, wt)
    if vc.get("model_type", VISION_TYPES[0]) not in VISION_TYPES:
        raise EdgemmError(f"{wv}: vision tower {vc['model_type']!r} is not supported ({', '.join(VISION_TYPES)})")
    sizes = [_req(vc, k, wv) for k in ("image_size", "patch_size")]
    if not all(isinstance(x, int) for x in sizes):
        raise EdgemmError(f"{wv}: image_size and patch_size must be single numbers (square tiles)")
    scale = hf.get("scale_factor", 2)
    if not isinstance(scale, int) or scale < 1:
        raise EdgemmError(f"{w}: scale_factor {scale!r} is not a positive whole number")
    vl = _req(vc, "num_hidden_layers", wv)
    cfg = ModelConfig(
        name=src.path.name,
        vision=VisionConfig(image_size=sizes[0], patch_size=sizes[1], width=_req(vc, "hidden_size", wv), layers=vl,
                            heads=_req(vc, "num_attention_heads", wv), mlp_dim=_req(vc, "intermediate_size", wv),
                            eps=vc.get("layer_norm_eps", 1e-6), gelu=_act(vc.get("hidden_act", "gelu_pytorch_tanh"), wv),
                            arch="siglip", feature_layer=vl, post_norm=True, tiling="smolvlm"),
        adapter=AdapterConfig(kind="pixel_shuffle_linear", downsample_ratio=1 / scale),
        decoder=decoder)
    from ..smolvlm_tiles import marker_ids, max_grid, rows_per_tile, tile_text
    _processor(src, cfg.vision, rows_per_tile(cfg))
    toks = image_tokens(src)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(src.path / "tokenizer.json"))
    cfg.vision.tile_text = tile_text(lambda s: tok.encode(s, add_special_tokens=False).ids, max_grid(cfg.vision),
                                     toks["fake_image_token"], toks["global_image_token"])
    cfg.adapter.marker_ids = marker_ids(cfg.vision.tile_text)
    cfg.validate()
    names = set(src.where)
    plan = Plan(cfg)
    decoder_plan(plan, src)
    vt = pick(names, ("model.vision_model.", "vision_model."), "embeddings.patch_embedding.weight")
    _siglip_vision(plan, vt, vl, True, names)
    plan.entries = [e for e in plan.entries if e.name != "vision.pos"]
    plan.add("vision.pos", vt + "embeddings.position_embedding.weight", fn=_positions)
    ids = list(cfg.adapter.marker_ids)
    plan.add("adapter.proj.weight", pick(names, ("model.connector.", "connector."), "modality_projection.proj.weight")
             + "modality_projection.proj.weight")
    emb = next(e.sources[0] for e in plan.entries if e.name == "decoder.tok_embeddings.weight")
    plan.add("adapter.markers", emb, fn=lambda t: t[0][ids].clone())
    v = cfg.vision
    plan.notes.append(f"image token id {hf.get('image_token_id')} ({toks['image_token']}): each tile is "
                      f"{rows_per_tile(cfg)} rows between the processor's tile markers; "
                      + (f"grids up to {max_grid(v)} x {max_grid(v)} tiles of {v.image_size} px after a resize to "
                         f"{v.longest_edge} px, + the whole image" if v.image_splitting else "the whole image alone")
                      + f": up to {cfg.n_image_rows} rows")
    _video(src, cfg.vision)
    if v.video:
        plan.notes.append(f"video: up to {v.video['frames']} frames at {v.video['fps']} a second, each the whole "
                          f"image alone after a resize to {v.video['longest_edge']} px, after a 'Frame from MM:SS:' "
                          "line, where the template puts <video>")
    else:
        plan.notes.append("video input is not imported (no video_preprocessor_config.json with video_sampling)")
    return plan


# SmolVLMProcessor's text around a clip's frames (processing_smolvlm.py: DEFAULT_VIDEO_INTRO, FRAME_TIMESTAMP_MESSAGE,
# DEFAULT_MEDIA_OUTTRO), each frame's <image> expanded as a whole image alone (edgemm.video.video_text)
VIDEO_TEXT = {"intro": "You are provided the following series of {count} frames from a {duration} [H:MM:SS] video.\n",
              "frame": "\nFrame from {t}:" + IMAGE, "sep": "", "outro": "\n\n"}


def _video(src: Source, v: VisionConfig) -> None:
    """video_preprocessor_config.json (SmolVLMVideoProcessor) -> VisionConfig.video: its sample_frames (video_sampling
    max_frames at fps), its two resizes (video_size's longest edge, then max_image_size square), its mean and std."""
    from ..video import processor_settings
    vp, w = processor_settings(src.path), "video_preprocessor_config.json"
    vs = vp.get("video_sampling") or {}
    if not vs:
        return
    frames, fps = vs.get("max_frames"), vs.get("fps")
    edge = (vs.get("video_size") or vp.get("size") or {}).get("longest_edge")
    tile = (vp.get("max_image_size") or {}).get("longest_edge", v.image_size)
    ok = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0       # noqa: E731
    if not (ok(frames) and int(frames) == frames and ok(fps) and ok(edge) and tile == v.image_size):
        raise EdgemmError(f"{w}: video_sampling max_frames {frames!r}, fps {fps!r}, video_size {edge!r} (positive) and "
                          f"max_image_size {tile!r} (the tower's {v.image_size}) are what edgemm reads")
    if vp.get("resample", LANCZOS) != LANCZOS:
        raise EdgemmError(f"{w}: resample {vp['resample']!r} is not supported (LANCZOS)")
    v.video = {"frames": int(frames), "fps": fps, "sample": "smolvlm", "longest_edge": int(edge), **VIDEO_TEXT}
    for k in ("image_mean", "image_std"):
        if isinstance(vp.get(k), list) and len(vp[k]) == 3:
            v.video[k] = [float(x) for x in vp[k]]


@register
class SmolVLM(Family):
    name = "smolvlm"
    model_types = ("smolvlm", "idefics3")
    architectures = ("smolvlmforconditionalgeneration", "idefics3forconditionalgeneration")
    source = "`SmolVLMForConditionalGeneration`, `Idefics3ForConditionalGeneration` (Llama language models)"
    computes = "SigLIP tower, pixel shuffle + Linear connector, tile grid with `<row_i_col_j>` / `<global-img>` " \
               "markers; one branch; video frames as whole images with their times"
    blocks = ("vision:siglip", "connector:pixel_shuffle_linear", "layer:single")
    core = ("single branch (llava)", "siglip vision tower", "pixel-shuffle linear projector", "tile grid (smolvlm)")
    optional = ("grouped-query attention",)

    def plan(self, hf, src, rules="original"):
        return map_smolvlm(hf, src, rules)

    def adapt_template(self, template: str, src) -> str:
        """The checkpoint's template renders an image as its image token: stored as edgemm's <image> placeholder."""
        t = image_tokens(src)["image_token"]
        return template if t == IMAGE else template.replace(t, IMAGE)
