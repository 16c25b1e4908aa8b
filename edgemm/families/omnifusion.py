"""OmniFusion (AIRI, arXiv 2404.06212; code AIRI-Institute/OmniFusion) -> edgemm: a vision tower, an adapter, the
trainable begin/end-of-image rows, a Mistral language model (one branch).

Two source layouts:

- the release (OmniMistral-v1_1 on the Hugging Face hub, read by the repository's README and train_src): a directory
  `tuned-model/` (a Hugging Face MistralForCausalLM), `tokenizer/`, `projection.pt` (the adapter, a whole pickled
  VisualToGPTMapping: one torch TransformerEncoderLayer at the CLIP width, post-norm, then `linear` to the LLM
  width) and `special_embeddings.pt` (a dict of rows SOI, EOI, USER, BOT). The CLIP tower is not in it: the
  release loads openai/clip-vit-large-patch14-336 and takes hidden_states[-2] without CLS; edgemm reads that
  checkpoint from `clip/` in the directory (a copy or a link). The pickles need --allow-bin and are read with
  torch.load(weights_only=True), every class they name mapped to an inert stand-in (importers.shards.load_pickle).
- a config.json of model_type "omnifusion" naming the towers by their Hugging Face layouts: `vision_config` (CLIP)
  and optionally `dinov2_config` (a Dinov2 / Dinov2WithRegisters config: the merged encoders), their tensors under
  `vision_tower.` and `dinov2.` in those models' own names, the language model under `language_model.`, the
  adapter under `projection.` (adapter_type "transformer": the release's names; "mlp": in_proj.{i}, out_proj) and
  the rows under `special_embeddings.`.

The release's USER and BOT rows (its prompt is text, SOI, image, EOI, USER, question, BOT) are not imported: edgemm's
prompts are token ids and image segments, and the chat template marks the turns.

Whole image only. The paper's abstract names "whole image or tiles encoding", but no source readable here says how
the tiles are cut (grid, tile size, a global view, their order, markers): every file at every commit of
AIRI-Institute/OmniFusion (80 commits, main the only branch: models.py, utils.py, test.py, train_src/*, README,
docs/index.html, the architecture figures) encodes one image per SOI/EOI pair, and the model card, the Habr post and
the paper's stored copies give no more than the abstract's phrase. No tiling is invented for it.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..config import AdapterConfig, ModelConfig, VisionConfig
from ..errors import EdgemmError
from ..importers.shards import Source, load_pickle
from . import Family, register
from .base import CLIP_MEAN, CLIP_STD, Plan, _act, _cat, _clip_vision, _req
from .llava import decoder_config, decoder_plan, feature_layer, pick

RELEASE_FILES = ("projection.pt", "special_embeddings.pt")
DINO_MEAN, DINO_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)      # BitImageProcessor's (ImageNet) defaults


# --------------------------------------------------------------------------- the release's parts
def _config(d: Path, what: str) -> dict:
    f = d / "config.json"
    if not f.is_file():
        raise EdgemmError(f"{d}: {what} lacks config.json")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise EdgemmError(f"{f} is not valid JSON ({e})") from None


def open_release(src: Path, allow_bin: bool = False):
    """The release's directory -> (config dict in the config.json form above, source, tokenizer dir)."""
    for need in ("tuned-model", "clip"):
        if not (src / need).is_dir():
            raise EdgemmError(f"{src}: OmniFusion's release layout needs {need}/ (" + (
                "the tuned Mistral" if need == "tuned-model" else "the CLIP tower the release loads, "
                "openai/clip-vit-large-patch14-336: copy or link it there") + ")")
    if not allow_bin:
        raise EdgemmError(f"{src}: projection.pt and special_embeddings.pt (OmniFusion's release) are pickles; pass "
                          "--allow-bin to read them with torch.load(weights_only=True), nothing in them run")
    proj, special = (load_pickle(src / f) for f in RELEASE_FILES)
    clip = _config(src / "clip", "clip/")
    heads = proj.get("transformer_layer.self_attn.num_heads")
    if "transformer_layer.linear1.weight" not in proj or not isinstance(heads, int):
        raise EdgemmError(f"{src / 'projection.pt'} is not OmniFusion's VisualToGPTMapping (a transformer layer and "
                          "`linear`)")
    if proj.get("transformer_layer.norm_first", 0):
        raise EdgemmError(f"{src / 'projection.pt'}: a pre-norm (norm_first) adapter layer is not supported")
    hf = {"model_type": "omnifusion", "text_config": _config(src / "tuned-model", "tuned-model/"),
          "vision_config": clip.get("vision_config", clip), "vision_feature_layer": -2, "adapter_type": "transformer",
          "adapter_heads": heads, "adapter_eps": proj.get("transformer_layer.norm1.eps", 1e-5)}
    parts = [("language_model.", Source(src / "tuned-model", allow_bin)), ("vision_tower.", Source(src / "clip")),
             ("projection.", {k: v for k, v in proj.items() if hasattr(v, "shape")}),
             ("special_embeddings.", special)]
    tok = src / "tokenizer" if (src / "tokenizer" / "tokenizer.json").is_file() else None
    return hf, Source.of_parts(src, parts, allow_bin), tok


# --------------------------------------------------------------------------- the plan
def _dinov2(plan: Plan, pre: str, dc: dict, used: int, names: set, grid: int) -> dict:
    """A Dinov2Model / Dinov2WithRegistersModel under `pre` -> vision.dino.* (transformers 5 names and the older
    attention.attention.query / attention.output.dense ones); the position table interpolated to the tower's grid
    once, as interpolate_pos_encoding does. -> the tower's VisionConfig fields."""
    from ..blocks.dinov2 import interpolate_pos
    w = "config.json dinov2_config"
    if dc.get("use_swiglu_ffn"):
        raise EdgemmError(f"{w}: the SwiGLU FFN (DINOv2 giant) is not supported")
    regs = int(dc.get("num_register_tokens", 0)) if dc.get("model_type") == "dinov2_with_registers" else 0
    W = _req(dc, "hidden_size", w)
    e, em = "vision.dino.", pre + "embeddings."
    plan.add(e + "cls", em + "cls_token")
    plan.add(e + "pos", em + "position_embeddings", fn=lambda t: interpolate_pos(t[0], grid, regs > 0))
    if regs:
        plan.add(e + "registers", em + "register_tokens")
    plan.ignore(em + "mask_token", "masked-image-modelling token (training only)")
    for n in ("weight", "bias"):
        plan.add(e + f"patch_embed.{n}", em + f"patch_embeddings.projection.{n}")
    new = f"{pre}encoder.layer.0.attention.q_proj.weight" in names
    for i in range(dc["num_hidden_layers"]):
        s, b = f"{pre}encoder.layer.{i}.", f"{e}blocks.{i}."
        att = [s + "attention." + (x if new else f"attention.{y}") for x, y in
               (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value"))]
        out = s + ("attention.o_proj" if new else "attention.output.dense")
        if i >= used:
            for k in sorted(names):
                if k.startswith(s):
                    plan.ignore(k, "DINOv2 layer after the feature layer")
            continue
        for n in ("weight", "bias"):
            plan.add(b + f"qkv.{n}", *(a + f".{n}" for a in att), fn=_cat)
            for ours, theirs in (("proj", out), ("ln1", s + "norm1"), ("ln2", s + "norm2"), ("fc1", s + "mlp.fc1"),
                                 ("fc2", s + "mlp.fc2")):
                plan.add(b + f"{ours}.{n}", f"{theirs}.{n}")
        plan.add(b + "ls1", s + "layer_scale1.lambda1")
        plan.add(b + "ls2", s + "layer_scale2.lambda1")
    final = used == dc["num_hidden_layers"]
    for n in ("weight", "bias"):
        if final:
            plan.add(e + f"final_norm.{n}", pre + f"layernorm.{n}")
        else:
            plan.ignore(pre + f"layernorm.{n}", "DINOv2's final layernorm (the family takes an earlier layer)")
    return {"width": W, "layers": dc["num_hidden_layers"], "heads": _req(dc, "num_attention_heads", w),
            "mlp_dim": int(W * dc.get("mlp_ratio", 4)), "eps": dc.get("layer_norm_eps", 1e-6),
            "gelu": _act(dc.get("hidden_act", "gelu"), w), "feature_layer": used, "registers": regs,
            "final_norm": final, "image_mean": DINO_MEAN, "image_std": DINO_STD}


def map_omnifusion(hf: dict, src, rules: str = "original") -> Plan:
    w, wv = "config.json", "config.json vision_config"
    tc, vc = _req(hf, "text_config", w), _req(hf, "vision_config", w)
    names = set(src.where)
    decoder = decoder_config(hf, tc, "config.json text_config")
    if vc.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
        raise EdgemmError(f"{wv}: vision tower {vc.get('model_type')!r} is not supported (a CLIP vision model)")
    fl, vl, used = feature_layer(hf, vc, -2)
    size, patch = _req(vc, "image_size", wv), _req(vc, "patch_size", wv)
    kind = hf.get("adapter_type", "transformer")
    if kind not in ("transformer", "mlp"):
        raise EdgemmError(f"{w}: adapter_type {kind!r} is not supported (transformer, mlp)")
    dc = hf.get("dinov2_config")
    if dc and kind != "mlp":
        raise EdgemmError(f"{w}: the merged encoders (dinov2_config) go with adapter_type 'mlp'")
    p = "projection."
    ffn = src.shapes.get(p + ("transformer_layer.linear1.weight" if kind == "transformer" else "out_proj.weight"))
    if ffn is None:
        raise EdgemmError(f"the checkpoint has no {kind} adapter under {p!r}")
    vision = VisionConfig(image_size=size, patch_size=patch, width=_req(vc, "hidden_size", wv), layers=vl,
                          heads=_req(vc, "num_attention_heads", wv), mlp_dim=_req(vc, "intermediate_size", wv),
                          eps=vc.get("layer_norm_eps", 1e-5), gelu=_act(vc.get("hidden_act", "quick_gelu"), wv),
                          image_mean=CLIP_MEAN, image_std=CLIP_STD, arch="clip+dinov2" if dc else "clip",
                          feature_layer=used)
    adapter = AdapterConfig(kind="omni_" + kind, ffn_dim=ffn[0] if kind == "transformer" else ffn[1], gelu="erf",
                            eps=float(hf.get("adapter_eps", 1e-5)), attn_heads=int(hf.get("adapter_heads", 4)))
    plan = Plan(ModelConfig(name=src.path.name, vision=vision, adapter=adapter, decoder=decoder))
    vt = pick(names, ("vision_tower.vision_model.", "vision_tower."), "embeddings.class_embedding")
    _clip_vision(plan, vt, used, "CLIP's post_layernorm (the pooled output's)")
    if dc:
        dfl = hf.get("dinov2_feature_layer", -1)
        dused = dc["num_hidden_layers"] + 1 + dfl if dfl < 0 else dfl
        if not 0 < dused <= dc["num_hidden_layers"]:
            raise EdgemmError(f"{w}: dinov2_feature_layer {dfl} is out of range")
        vision.second = _dinov2(plan, "dinov2.", dc, dused, names, size // patch)
        for e in plan.entries:
            if e.name.startswith("vision.") and not e.name.startswith("vision.dino."):
                e.name = "vision.clip." + e.name[len("vision."):]
    for k in sorted(names):
        if k.startswith(vt + "encoder.layers.") and int(k[len(vt + "encoder.layers."):].split(".")[0]) >= used:
            plan.ignore(k, "CLIP layer after the feature layer")
        elif k.startswith("vision_tower.") and not k.startswith(vt):
            plan.ignore(k, "CLIP's text model and projections (a CLIPModel checkpoint)")
    if kind == "transformer":
        t = p + "transformer_layer."
        for n in ("weight", "bias"):
            plan.add(f"adapter.qkv.{n}", t + f"self_attn.in_proj_{n}")
            for ours, theirs in (("o", "self_attn.out_proj"), ("norm1", "norm1"), ("norm2", "norm2"),
                                 ("linear1", "linear1"), ("linear2", "linear2")):
                plan.add(f"adapter.{ours}.{n}", t + f"{theirs}.{n}")
            plan.add(f"adapter.linear.{n}", p + f"linear.{n}")
    else:
        for n in ("weight", "bias"):
            for i in range(2 if dc else 1):
                plan.add(f"adapter.in_proj.{i}.{n}", p + f"in_proj.{i}.{n}")
            plan.add(f"adapter.out_proj.{n}", p + f"out_proj.{n}")
    for ours, theirs in (("boi", "SOI"), ("eoi", "EOI")):
        plan.add(f"adapter.{ours}", f"special_embeddings.{theirs}", fn=lambda t: t[0].reshape(1, 1, -1))
    for k in ("USER", "BOT"):
        plan.ignore(f"special_embeddings.{k}", "OmniFusion's USER / BOT rows: edgemm's chat template marks turns")
    decoder_plan(plan, src)
    return plan


@register
class OmniFusion(Family):
    name = "omnifusion"
    model_types = ("omnifusion",)
    source = ("OmniFusion's release (tuned-model/, projection.pt, special_embeddings.pt + the CLIP tower in clip/); "
              "a config.json naming CLIP (+ `Dinov2Model`) towers")
    computes = ("CLIP (+ DINOv2, merged: per-encoder first MLP layer, summed) tower, transformer or MLP adapter, "
                "begin/end-of-image rows; Mistral, one branch; whole image")
    blocks = ("vision:clip", "vision:clip+dinov2", "connector:omni_transformer", "connector:omni_mlp", "layer:single")
    core = ("single branch (llava)", "begin/end-of-image rows (omnifusion)")
    release_files = RELEASE_FILES
    # The release's prompt (its README's gen_answer): the system line, then each turn's image and question, the answer
    # after it (the USER / BOT rows around the question are not imported, see above).
    chat_template = ("This is a dialog with AI assistant.\n{% for m in messages %}{% for p in m['content'] %}"
                     "{% if p['type'] == 'image' %}<image>{% endif %}{% endfor %}{% for p in m['content'] %}"
                     "{% if p['type'] == 'text' %}{{ p['text'] }}{% endif %}{% endfor %}"
                     "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}")
    optional = ("grouped-query attention", "clip vision tower", "merged clip + dinov2 towers (omnifusion)",
                "omnifusion transformer adapter", "omnifusion mlp adapter")

    def open_release(self, src, allow_bin=False):
        return open_release(src, allow_bin)

    def plan(self, hf, src, rules="original"):
        return map_omnifusion(hf, src, rules)
