"""LLaMA-VID's released layout (dvlab-research/LLaMA-VID: `LlavaLlamaAttForCausalLM`, model_type "llava") -> edgemm:
LAVIS's EVA ViT-g, the llamavid connector (edgemm.blocks.llamavid: a context token and pooled content rows a frame,
the context from the question), a single-branch Llama decoder.

The layout, as the released code reads it (llamavid/model/llamavid_arch.py, language_model/llava_llama_vid.py,
model/builder.py): one flat Llama config.json with mm_vision_tower (the path of LAVIS's eva_vit_g.pth), mm_hidden_size,
mm_projector_type 'mlp2x_gelu', mm_vision_select_feature 'patch', bert_type 'qformer_pretrain...', num_query,
compress_type 'mean' | 'grid:g'; tensors model.* + lm_head (Llama), model.mm_projector.{0,2}, model.vlm_att_query
[1, Q, 768], model.vlm_att_encoder.bert.* (LAVIS's BertLMHeadModel without its cls head: embeddings, encoder.layer.i
with attention, crossattention every 2nd layer (init_bert's cross_attention_freq), intermediate / output for the
question's rows, intermediate_query / output_query for the queries'), model.vlm_att_ln, model.vlm_att_projector,
model.vlm_att_key_projector, model.vlm_att_val_projector. The tower's weights: model.vision_tower.vision_tower.* when
the checkpoint holds them, else the eva_vit_g.pth file (LAVIS's names; a pickle, read with --allow-bin) inside the
checkpoint folder at mm_vision_tower's path or under its last name. Shapes come from the tensors; the heads as the
release's code fixes them: the tower's width // 88 (EVAVisionTowerLavis: 1408 // 88), the Q-Former's width // 64
(bert-base-uncased's 12 of 64). Nothing is downloaded: the Q-Former's BERT tokenizer (bert-base-uncased, which the
code loads from the hub) is qformer_tokenizer/tokenizer.json in the checkpoint folder or --tokenizer DIR.

Frames (edgemm.video): one a second (the release's load_video: every round(clip fps)-th frame from the first), each
resized on its shortest edge and centre-cropped (its CLIPImageProcessor, CLIP's mean and std), all through the vision
stage with the question; their rows, frame after frame, where the prompt has its <image> (the template's <video>).
The question is the turn's text, as the released cli's update_prompt([[inp]]); edgemm encodes a clip with its
conversation's first question and keeps the rows (and KV cache) for later turns, where the released cli re-encodes
the clip with each new question.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from ..config import AdapterConfig, ModelConfig, VisionConfig
from ..errors import EdgemmError

from . import Family, register
from .base import CLIP_MEAN, CLIP_STD, Plan, _req
from .llava import decoder_config, decoder_plan
from .llava_original import LLAVA_V1_TEMPLATE
from ..importers.shards import Source, load_pickle

IN_CHECKPOINT = "model.vision_tower.vision_tower."
EVA_FILE = "eva."                   # the prefix of eva_vit_g.pth's tensors once merged into the source
QF = "model.vlm_att_encoder.bert."
# the released chat format (conv_llava_v1, which the released cli picks for 'vid' models), a clip placed as an image
TEMPLATE = LLAVA_V1_TEMPLATE.replace("if p['type'] == 'image' %}<image>",
                                     "if p['type'] in ('image', 'video') %}{{ '<video>' if p['type'] == 'video' "
                                     "else '<image>' }}")
assert TEMPLATE != LLAVA_V1_TEMPLATE


def _tower_source(hf: dict, src: Source) -> str:
    """The tower's tensor prefix: in the checkpoint, or eva_vit_g.pth's tensors merged under EVA_FILE."""
    if IN_CHECKPOINT + "cls_token" in src.where:
        return IN_CHECKPOINT
    name = _req(hf, "mm_vision_tower", "config.json")
    if not isinstance(name, str) or not name.strip("./"):
        raise EdgemmError(f"config.json: mm_vision_tower {name!r} is not a path")
    root = src.path.resolve()
    rel = name[2:] if name.startswith("./") else name
    f = next((c.resolve() for c in (root / rel, root / Path(rel).name)
              if c.resolve().is_relative_to(root) and c.resolve().is_file()), None)
    if f is None:
        raise EdgemmError(f"config.json's mm_vision_tower {name!r}: the checkpoint holds no {IN_CHECKPOINT}* tensors "
                          f"and there is no {root / rel} or {root / Path(rel).name}; edgemm downloads nothing: put "
                          "LAVIS's eva_vit_g.pth there")
    if not src.allow_bin:
        raise EdgemmError(f"{f} is a pickle (torch.save), and unpickling a file can run code; pass --allow-bin to read "
                          "it with torch.load(weights_only=True) if you trust where it comes from")
    src.add_tensors(f.name, {EVA_FILE + k: t for k, t in load_pickle(f).items() if hasattr(t, "shape")})
    return EVA_FILE


def _processor(hf: dict, src: Source, side: int, patch: int) -> tuple[int, tuple, tuple]:
    """Image size, mean, std: the image_processor folder's CLIPImageProcessor where the checkpoint holds it (the
    release's llamavid/processor/clip-patch14-224), else the tower's own size and CLIP's mean and std (that file's)."""
    size, mean, std = side * patch, CLIP_MEAN, CLIP_STD
    name = hf.get("image_processor")
    if isinstance(name, str) and name.strip("./"):
        root = src.path.resolve()
        rel = name[2:] if name.startswith("./") else name
        for c in (root / rel, root / Path(rel).name):
            f = (c / "preprocessor_config.json").resolve()
            if f.is_relative_to(root) and f.is_file():
                try:
                    p = json.loads(f.read_text())
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise EdgemmError(f"{f} is not valid JSON ({e})") from None
                crop = p.get("crop_size", size) if isinstance(p, dict) else None
                crop = crop.get("height") if isinstance(crop, dict) else crop
                if crop != size:
                    raise EdgemmError(f"{f}: crop_size {crop} differs from the tower's {size} px (its position table; "
                                      "the release's interpolate_pos_embed is not computed)")
                mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
                break
    return size, mean, std


def _count(names, prefix: str) -> int:
    return len({int(m.group(1)) for k in names if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})


def map_llamavid(hf: dict, src: Source, rules: str = "original") -> Plan:
    w = "config.json"
    for key, want in (("mm_projector_type", "mlp2x_gelu"), ("mm_vision_select_feature", "patch")):
        if hf.get(key, want) != want:
            raise EdgemmError(f"{w}: {key} {hf[key]!r} is not supported ({want!r}, as the released models)")
    bert = str(hf.get("bert_type", ""))
    if "qformer" not in bert or "pretrain" not in bert:
        raise EdgemmError(f"{w}: bert_type {bert!r} is not supported (LLaMA-VID's 'qformer_pretrain': the Q-Former "
                          "with vlm_att_ln over the EVA tower)")
    ct = hf.get("compress_type") or "mean"
    g = 1 if ct == "mean" else int(ct.split("grid:")[-1]) if re.fullmatch(r"grid:\d+", ct) else 0
    if g < 1:
        raise EdgemmError(f"{w}: compress_type {ct!r} is not supported ('mean', 'grid:g')")
    if "model.vlm_att_bert_proj.weight" in src.where:
        raise EdgemmError("model.vlm_att_bert_proj (a CLIP tower's features mapped to EVA's width) is not supported: "
                          "edgemm imports LLaMA-VID with LAVIS's EVA tower")
    vt = _tower_source(hf, src)
    names = set(src.where)
    W, side2, patch = src.shapes[vt + "pos_embed"][-1], src.shapes[vt + "pos_embed"][1] - 1, \
        src.shapes[vt + "patch_embed.proj.weight"][-1]
    side = math.isqrt(side2)
    if side * side != side2 or side % g or W % 88:
        raise EdgemmError(f"the EVA tower: {side2} position rows past CLS (a square grid wanted), width {W} (a multiple "
                          f"of 88: the release's heads are width // 88), compress grid {g} dividing the grid's side")
    if hf.get("mm_hidden_size", W) != W:
        raise EdgemmError(f"{w}: mm_hidden_size {hf['mm_hidden_size']} differs from the EVA tower's width {W}")
    size, mean, std = _processor(hf, src, side, patch)
    QW, QL = src.shapes[QF + "embeddings.word_embeddings.weight"][1], _count(names, QF + "encoder.layer.")
    crosses = [i for i in range(QL) if QF + f"encoder.layer.{i}.crossattention.self.key.weight" in names]
    if crosses != list(range(0, QL, 2)) or QW % 64:
        raise EdgemmError(f"the Q-Former: cross-attention in layers {crosses} (init_bert: every 2nd from 0), width {QW} "
                          "(a multiple of 64: bert-base's heads)")
    cfg = ModelConfig(
        name=src.path.name,
        vision=VisionConfig(image_size=size, patch_size=patch, width=W, layers=_count(names, vt + "blocks."),
                            heads=W // 88, mlp_dim=src.shapes[vt + "blocks.0.mlp.fc1.weight"][0], eps=1e-6,
                            gelu="erf", image_mean=mean, image_std=std, arch="eva_lavis",
                            video={"fps": 1, "sample": "step", "question": True}),
        adapter=AdapterConfig(kind="llamavid", eps=1e-12, gelu="erf", bias=True,
                              query_tokens=src.shapes["model.vlm_att_query"][1], qformer_width=QW, qformer_layers=QL,
                              qformer_heads=QW // 64, qformer_ffn=src.shapes[QF + "encoder.layer.0.intermediate.dense.weight"][0],
                              cross_attention_frequency=2, qformer_text=True,
                              qformer_vocab=src.shapes[QF + "embeddings.word_embeddings.weight"][0],
                              qformer_positions=src.shapes[QF + "embeddings.position_embeddings.weight"][0],
                              pool_tokens=g * g),
        decoder=decoder_config(hf, {**hf, "model_type": "llama"}, w))
    plan = Plan(cfg)
    decoder_plan(plan, src)
    _tower_plan(plan, vt, names)
    _connector_plan(plan, QL)
    plan.notes.append(f"a frame (an image: one frame) is {cfg.n_image_rows} rows: the context token (its {cfg.adapter.query_tokens} "
                      f"queries read with the question), {g * g} content row(s) (compress_type {ct!r}); clips at 1 "
                      "frame a second")
    return plan


def _tower_plan(plan: Plan, vt: str, names: set) -> None:
    """LAVIS's EVA ViT-g names -> edgemm.blocks.llamavid.LavisEvaTower (ClipBlocks; q_bias, a zero k bias, v_bias)."""
    import torch
    plan.add("vision.cls", vt + "cls_token")
    plan.add("vision.pos", vt + "pos_embed")
    for n in ("weight", "bias"):
        plan.add(f"vision.patch_embed.{n}", vt + f"patch_embed.proj.{n}")
    used = {vt + k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")}
    for i in range(plan.cfg.vision.layers):
        s, e = f"{vt}blocks.{i}.", f"vision.blocks.{i}."
        plan.add(e + "qkv.weight", s + "attn.qkv.weight")
        plan.add(e + "qkv.bias", s + "attn.q_bias", s + "attn.v_bias",
                 fn=lambda t: torch.cat([t[0], torch.zeros_like(t[0]), t[1]]))
        used |= {s + "attn.qkv.weight", s + "attn.q_bias", s + "attn.v_bias"}
        for n in ("weight", "bias"):
            for ours, theirs in (("ln1", "norm1"), ("proj", "attn.proj"), ("ln2", "norm2"), ("fc1", "mlp.fc1"),
                                 ("fc2", "mlp.fc2")):
                plan.add(e + f"{ours}.{n}", s + f"{theirs}.{n}")
                used.add(s + f"{theirs}.{n}")
    for k in names:
        if k.startswith(vt) and k not in used:
            plan.ignore(k, "not in LLaMA-VID's tower (EVAVisionTowerLavis loads eva_vit_g.pth with strict=False)")


def _connector_plan(plan: Plan, n_layers: int) -> None:
    """The Q-Former (LAVIS's BERT names) and LLaMA-VID's projectors -> edgemm.blocks.llamavid.LlamaVidTokens."""
    a, m = "adapter.qformer.", "model."
    plan.add(a + "query", m + "vlm_att_query")
    plan.add(a + "word_embed.weight", QF + "embeddings.word_embeddings.weight")
    plan.add(a + "pos_embed.weight", QF + "embeddings.position_embeddings.weight")
    plan.ignore(QF + "embeddings.position_ids", "position index buffer")
    for n in ("weight", "bias"):
        plan.add(a + f"norm.{n}", QF + f"embeddings.LayerNorm.{n}")
        for ours, theirs in (("qformer.proj", "vlm_att_projector"), ("ln", "vlm_att_ln"), ("key", "vlm_att_key_projector"),
                             ("val", "vlm_att_val_projector"), ("mm.linear_1", "mm_projector.0"),
                             ("mm.linear_2", "mm_projector.2")):
            plan.add(f"adapter.{ours}.{n}", m + f"{theirs}.{n}")
        for i in range(n_layers):
            s, e = f"{QF}encoder.layer.{i}.", f"{a}layers.{i}."
            for hs, es in (("attention.", "self_attn."),) + ((("crossattention.", "cross_attn."),) if i % 2 == 0 else ()):
                for hn, en in (("query", "q"), ("key", "k"), ("value", "v")):
                    plan.add(e + f"{es}{en}.{n}", s + f"{hs}self.{hn}.{n}")
                plan.add(e + f"{es}o.{n}", s + f"{hs}output.dense.{n}")
                plan.add(e + f"{es}norm.{n}", s + f"{hs}output.LayerNorm.{n}")
            for inter, out, es in (("intermediate_query.", "output_query.", "ffn."), ("intermediate.", "output.", "ffn_text.")):
                plan.add(e + f"{es}fc1.{n}", s + f"{inter}dense.{n}")
                plan.add(e + f"{es}fc2.{n}", s + f"{out}dense.{n}")
                plan.add(e + f"{es}norm.{n}", s + f"{out}LayerNorm.{n}")


@register
class LlamaVid(Family):
    name = "llamavid"
    architectures = ("llavallamaattforcausallm",)
    source = "dvlab-research/LLaMA-VID release (`LlavaLlamaAttForCausalLM`, LAVIS's `eva_vit_g.pth`)"
    computes = ("video: 1 frame a second, each a context token (text-conditioned Q-Former queries attending to the "
                "frame) + a pooled content token; EVA ViT-g tower; one branch")
    blocks = ("vision:eva_lavis", "connector:llamavid", "layer:single")
    core = ("single branch (llava)", "eva vit-g vision tower (lavis)", "context + content tokens a frame (llama-vid)")
    optional = ("grouped-query attention",)
    chat_template = TEMPLATE

    def plan(self, hf, src, rules="original"):
        return map_llamavid(hf, src, rules)
