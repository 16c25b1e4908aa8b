"""LLaVA's original repository layout (haotian-liu/LLaVA's `LlavaLlamaForCausalLM`: LLaVA v1 with its single Linear
projector, LLaVA-1.5 with `mlp2x_gelu`) and Yi-VL's (01-ai/Yi's VL: the same class, `mlp2x_gelu_Norm`, the tower in
the checkpoint's vit/ folder) -> edgemm's LLaVA composition (single branch + CLIP tower + projector).

The layout, as the released code reads it: one flat Llama config.json with the mm_* keys (mm_vision_tower: the CLIP
checkpoint's hub name or path, mm_vision_select_layer, mm_vision_select_feature 'patch' | 'cls_patch',
mm_projector_type, mm_hidden_size, mm_use_im_start_end); the language model under model.* + lm_head; the projector
under model.mm_projector (an nn.Linear, or an nn.Sequential: 'mlp2x_gelu' [Linear, GELU, Linear], Yi's
'mlp2x_gelu_Norm' [Linear, LayerNorm, GELU, Linear, LayerNorm]); the tower as CLIPVisionModel.from_pretrained
(mm_vision_tower) loads it (Yi joins a './vit/...' path to the checkpoint folder), its weights there or, when the
tower was trained too, under model.vision_tower.vision_tower.vision_model.* in the checkpoint. Nothing is downloaded:
the tower's folder (its config.json, and its weights unless the checkpoint holds them) must be inside the
checkpoint folder, at mm_vision_tower's path or under its last name."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import AdapterConfig, ModelConfig
from ..errors import EdgemmError

from . import Family, register
from .base import Plan, _req
from .llava import (Llava, clip_tower_plan, clip_vision_config, decoder_config, decoder_plan, feature_layer,
                    pick)
from ..importers.shards import Source

# mm_projector_type -> (edgemm adapter kind, {edgemm module: index in the released nn.Sequential ("": a Linear)})
PROJECTORS = {"linear": ("linear", {"linear": ""}),
              "mlp2x_gelu": ("mlp", {"linear_1": "0.", "linear_2": "2."}),
              "mlp2x_gelu_Norm": ("mlp_norm", {"linear_1": "0.", "norm_1": "1.", "linear_2": "3.", "norm_2": "4."})}
IN_CHECKPOINT = "model.vision_tower.vision_tower.vision_model."
# the released chat formats (the checkpoints ship none), a system message replacing the default system text:
# haotian-liu/LLaVA's conv_llava_v1 (llava/conversation.py, SeparatorStyle.TWO: "USER: ... ASSISTANT: ...</s>"),
# what run_llava.py picks for "v1" model names; 01-ai/Yi's mm_default (VL/llava/conversation.py, "### Human: ...").
_SYSTEM = ("{% set ns = namespace(system=%s) %}{% for m in messages if m['role'] == 'system' %}"
           "{% set ns.system = m['content'] | map(attribute='text') | join('') %}{% endfor %}")
_PARTS = ("{% for p in m['content'] if p['type'] == 'image' %}<image>\n{% endfor %}"
          "{% for p in m['content'] if p['type'] == 'text' %}{{ p['text'] }}{% endfor %}")
LLAVA_V1_TEMPLATE = (_SYSTEM.replace("%s", repr(
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions.")) + "{{ bos_token }}{{ ns.system }} "
    "{% for m in messages if m['role'] != 'system' %}{% if m['role'] == 'user' %}USER: " + _PARTS + " {% else %}"
    "ASSISTANT: " + _PARTS + "{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
YI_VL_TEMPLATE = (_SYSTEM.replace("%s", repr(
    "This is a chat between an inquisitive human and an AI assistant. Assume the role of the AI assistant. Read all "
    "the images carefully, and respond to the human's questions with informative, helpful, detailed and polite "
    "answers. 这是一个好奇的人类和一个人工智能助手之间的对话。假设你扮演这个AI助手的角色。仔细阅读所有的图像，并对人类的问题做出信息丰富、"
    "有帮助、详细的和礼貌的回答。")) + "{{ ns.system }}\n\n### {% for m in messages if m['role'] != 'system' %}"
    "{% if m['role'] == 'user' %}Human: {% else %}Assistant: {% endif %}" + _PARTS + "{{ '\\n### ' }}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")


def tower_folder(hf: dict, src: Path) -> Path:
    """The CLIP tower's folder inside the checkpoint: mm_vision_tower as a path from it (Yi-VL's './vit/...', or a hub
    name 'openai/clip-vit-large-patch14-336' placed there), or its last name ('clip-vit-large-patch14-336')."""
    name = _req(hf, "mm_vision_tower", "config.json")
    if not isinstance(name, str) or not name.strip("./"):
        raise EdgemmError(f"config.json: mm_vision_tower {name!r} is not a tower name or path")
    root = src.resolve()
    rel = name[2:] if name.startswith("./") else name
    for cand in (root / rel, root / Path(rel.rstrip("/")).name):
        c = cand.resolve()
        if c.is_relative_to(root) and (c / "config.json").is_file():
            return c
    raise EdgemmError(f"config.json's mm_vision_tower {name!r}: no folder with its config.json at {root / rel} or "
                      f"{root / Path(rel.rstrip('/')).name}; edgemm downloads nothing: put the CLIP tower's folder "
                      "(config.json, and its weights unless the checkpoint holds them) there")


def _tower_config(folder: Path) -> dict:
    """The tower folder's CLIPVisionConfig (a CLIPModel's config.json: its vision_config)."""
    f = folder / "config.json"
    try:
        c = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgemmError(f"{f} is not valid JSON ({e})") from None
    vc = c.get("vision_config", c) if isinstance(c, dict) else None
    if not isinstance(vc, dict) or vc.get("model_type", "clip_vision_model") not in ("clip_vision_model", "clip"):
        raise EdgemmError(f"{f}: not a CLIP vision config (model_type "
                          f"{c.get('model_type') if isinstance(c, dict) else None!r})")
    return vc


def map_llava_original(hf: dict, src: Source, rules: str = "original", adapter=None, projector=None) -> Plan:
    """The plan of the layout; a projector outside PROJECTORS (LLaVA-UHD's resampler) gives its adapter config and
    projector(plan, cfg) that adds its tensors."""
    w = "config.json"
    pt = hf.get("mm_projector_type", "linear")          # the released builder's default
    if pt not in PROJECTORS and adapter is None:
        raise EdgemmError(f"{w}: mm_projector_type {pt!r} is not supported ({', '.join(PROJECTORS)})")
    merge = hf.get("mm_patch_merge_type", "flat")
    if merge != "flat" or hf.get("image_aspect_ratio") == "anyres":
        raise EdgemmError(f"{w}: mm_patch_merge_type {merge!r} / image_aspect_ratio "
                          f"{hf.get('image_aspect_ratio')!r} (LLaVA-1.6's tiles in the original layout) is not "
                          "supported; transformers' LlavaNext layout is (family llava_next)")
    select = hf.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise EdgemmError(f"{w}: mm_vision_select_feature {select!r} is not supported (patch, cls_patch)")
    folder = tower_folder(hf, src.path)
    vc, wv = _tower_config(folder), f"{folder.name}/config.json"
    fl, vl, used = feature_layer({"vision_feature_layer": hf.get("mm_vision_select_layer", -2)}, vc, -2)
    if hf.get("mm_hidden_size", vc.get("hidden_size")) != vc.get("hidden_size"):
        raise EdgemmError(f"{w}: mm_hidden_size {hf['mm_hidden_size']} differs from the tower's hidden_size "
                          f"{vc.get('hidden_size')} ({wv})")
    kind, modules = PROJECTORS.get(pt, (None, {}))
    cfg = ModelConfig(name=src.path.name, vision=clip_vision_config(vc, wv, vl, used, select == "cls_patch"),
                      adapter=adapter or AdapterConfig(kind=kind, gelu="erf", bias=True),   # nn.GELU(), Linear's bias
                      decoder=decoder_config(hf, {**hf, "model_type": "llama"}, w))
    pp = folder / "preprocessor_config.json"            # the tower's CLIPImageProcessor: its mean and std
    if pp.is_file():
        try:
            p = json.loads(pp.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EdgemmError(f"{pp} is not valid JSON ({e})") from None
        for k in ("image_mean", "image_std"):
            x = p.get(k, getattr(cfg.vision, k)) if isinstance(p, dict) else None
            if not (isinstance(x, (list, tuple)) and len(x) == 3 and all(isinstance(v, (int, float)) for v in x)):
                raise EdgemmError(f"{pp}: {k} must be three numbers, not {x!r}")
            setattr(cfg.vision, k, tuple(float(v) for v in x))
    names = set(src.where)
    if IN_CHECKPOINT + "embeddings.patch_embedding.weight" in names:
        vt = IN_CHECKPOINT                              # the tower trained with the model (its weights here)
    else:
        tower = Source(folder, allow_bin=src.allow_bin)
        src.merge(tower)                                # CLIPVisionModel's names (transformers 5 saves them bare)
        vt = pick(set(tower.where), ("vision_model.", ""), "embeddings.patch_embedding.weight")
    plan = Plan(cfg)
    decoder_plan(plan, src)
    clip_tower_plan(plan, src, vt, used, vl, fl)
    for k in set(src.where) - names:                    # the merged tower folder's other tensors
        if not k.startswith(vt):
            plan.ignore(k, "CLIP's text side (the tower folder holds a whole CLIPModel): LLaVA uses its vision model")
    pj = "model.mm_projector."
    for ours, idx in modules.items():
        for n in ("weight", "bias"):
            plan.add(f"adapter.{ours}.{n}", f"{pj}{idx}{n}")
    if projector is not None:
        projector(plan, cfg)
    else:
        plan.notes.append(f"projector {pt!r} (edgemm adapter {kind!r}); the image's {cfg.n_image_rows} rows replace "
                          "the prompt's <image>")
    cfg.vision.pad_square = hf.get("image_aspect_ratio") == "pad"     # the released expand2square, mean colour
    return plan


def _original(hf: dict) -> bool:
    """LLaVA's original layout: mm_vision_tower in a flat config, not LLaMA-VID's class (edgemm.families.llamavid,
    the same keys)."""
    return "mm_vision_tower" in hf and "LlavaLlamaAttForCausalLM" not in (hf.get("architectures") or [])


class _Original(Family):
    """The shared part of the original-layout families: detection by mm_vision_tower + the projector type, the plan,
    the released chat format, and the template's image (mm_use_im_start_end: <im_start><image><im_end>, as the
    released run_llava.py writes)."""
    projector_type = ""
    chat_template = LLAVA_V1_TEMPLATE
    blocks = ("vision:clip", "layer:single")
    optional = ("grouped-query attention",)

    def detect(self, hf: dict) -> bool:
        return _original(hf) and hf.get("mm_projector_type", "linear") == self.projector_type

    def plan(self, hf, src, rules="original"):
        return map_llava_original(hf, src, rules)

    def adapt_template(self, template: str, src) -> str:
        try:
            hf = json.loads((src.path / "config.json").read_text())
        except (OSError, ValueError):
            return template
        if hf.get("mm_use_im_start_end") and "<im_start><image>" not in template:
            return template.replace("<image>", "<im_start><image><im_end>")
        return template


@register
class YiVl(_Original):
    name = "yi_vl"
    projector_type = "mlp2x_gelu_Norm"
    chat_template = YI_VL_TEMPLATE
    stop = ("###",)                         # the released code cuts its answers there (conv.sep as stop_str)
    source = "01-ai/Yi's VL layout (`LlavaLlamaForCausalLM`, `mlp2x_gelu_Norm`, tower in `vit/`)"
    computes = "Linear-LayerNorm-GELU-Linear-LayerNorm projector"
    blocks = ("vision:clip", "connector:mlp_norm", "layer:single")
    core = ("single branch (llava)", "clip vision tower", "mlp-norm projector")


@register
class LlavaV1(_Original):
    name = "llava_v1"
    projector_type = "linear"
    source = "haotian-liu/LLaVA's layout (`LlavaLlamaForCausalLM`, `mm_projector_type` linear)"
    computes = "LLaVA v1's single Linear projector"
    blocks = ("vision:clip", "connector:linear", "layer:single")
    core = ("single branch (llava)", "clip vision tower", "linear projector")


@register
class LlavaOriginal(_Original):
    name = "llava_original"
    projector_type = "mlp2x_gelu"
    source = "haotian-liu/LLaVA's layout (`LlavaLlamaForCausalLM`, `mm_projector_type` mlp2x_gelu)"
    computes = "LLaVA-1.5's MLP projector, the tower from its own CLIP folder or the checkpoint"
    blocks = ("vision:clip", "connector:mlp", "layer:single")
    core = Llava.core

    def detect(self, hf: dict) -> bool:         # and any other projector type: the plan names the supported ones
        return _original(hf) and hf.get("mm_projector_type", "linear") not in (
            "linear", "mlp2x_gelu_Norm", "adapt_spatial_resampler")
