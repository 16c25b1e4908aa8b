"""`edgemm import`: Hugging Face-layout checkpoints (CogVLM, Libra, LLaVA, LLaVA-NeXT, BLIP-2, InstructBLIP,
Idefics) -> edgemm checkpoints.

A source is a directory with config.json, the weights (safetensors shards + model.safetensors.index.json, a single
model.safetensors, or pytorch_model*.bin read with torch.load(weights_only=True)) and tokenizer files.

1. The family comes from config.json (model_type / architectures / auto_map) unless given.
2. A family mapper turns the config into an edgemm ModelConfig and a plan: every edgemm tensor with the source
   tensors it is made of (renames, fused QKV concatenations, a reordered position table) and the source tensors
   that are deliberately not imported, each with its reason. Everything is checked before a byte is written:
   unexpected or missing tensors, missing shards, shapes (the recipes run on meta tensors).
3. Streaming: the source shards are opened one at a time with safetensors' safe_open (memory-mapped) and closed
   before the next; output tensors are written as they are produced into pre-planned output shards whose
   headers are known up front, so at most one converted tensor is held in memory (plus the few source tensors
   of a recipe that straddles two shards). Peak resident memory stays near the largest source shard.
4. Everything is written into a temporary sibling directory renamed into place at the end.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..bundle import check_out
from ..checkpoint import atomic_dir
from ..errors import EdgemmError

from .blip2 import map_blip2
from .cogvlm import map_cogvlm
from .idefics import map_idefics
from .libra import map_libra
from .llava import map_llava, map_llava_next
from .shards import DEFAULT_SHARD_BYTES, Source, check_plan, stream_convert

FAMILIES = ("cogvlm", "llava", "libra", "llava_next", "blip2", "instructblip", "idefics")
MAPPERS = {"cogvlm": map_cogvlm, "llava": map_llava, "libra": map_libra, "llava_next": map_llava_next,
           "blip2": map_blip2, "instructblip": map_blip2, "idefics": map_idefics}


# --------------------------------------------------------------------------- families
def detect_family(hf: dict, where: str = "config.json") -> str:
    mt = str(hf.get("model_type", "")).lower()
    arch = " ".join(hf.get("architectures") or []).lower()
    auto = json.dumps(hf.get("auto_map") or {}).lower()
    if mt == "llava_next" or "llavanextforconditionalgeneration" in arch:
        return "llava_next"
    if mt == "llava" or "llavaforconditionalgeneration" in arch:
        return "llava"
    if mt == "blip-2" or "blip2forconditionalgeneration" in arch:
        return "blip2"
    if mt == "instructblip" or "instructblipforconditionalgeneration" in arch:
        return "instructblip"
    if mt == "idefics" or "ideficsforvisiontext2text" in arch:
        return "idefics"
    if mt == "libra" or "libraforcausallm" in arch:
        return "libra"
    if mt == "cogvlm" or "cogvlm" in arch or "cogvlm" in auto:
        return "cogvlm"
    raise EdgemmError(f"cannot tell the model family from {where} (model_type={mt or None!r}, "
                      f"architectures={hf.get('architectures')}); edgemm imports {', '.join(FAMILIES)}: "
                      "pass --from if it is one of them")


# --------------------------------------------------------------------------- tokenizer
def _install_tokenizer(src: Path, tok_dir: Path | None, out: Path, log) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from ..tokenizer import BOS, CHAT_TEMPLATE, EOS, PAD, Tokenizer
    d = tok_dir or src
    f = d / "tokenizer.json"
    if not f.is_file():
        if tok_dir is None:
            raise EdgemmError(f"{src} ships no tokenizer.json; pass --tokenizer DIR (a directory with the model's "
                              "tokenizer.json, e.g. the Vicuna/LLaMA tokenizer for cogvlm-chat-hf)")
        raise EdgemmError(f"--tokenizer {tok_dir}: no tokenizer.json there")
    try:
        tok = HFTokenizer.from_file(str(f))
    except Exception as e:
        raise EdgemmError(f"cannot read tokenizer {f}: {e}") from None
    missing = [t for t in (BOS, EOS) if tok.token_to_id(t) is None]
    if missing:
        raise EdgemmError(f"{f} lacks {' and '.join(missing)}, which edgemm's prompt format needs")
    if tok.token_to_id(PAD) is None:
        tok.add_special_tokens([PAD])
        log(f"note: the tokenizer has no {PAD}; added it as id {tok.token_to_id(PAD)} (used for padding only)")
    Tokenizer(tok).save(out / "tokenizer.json")
    template = None
    for cand in (d / "chat_template.jinja", src / "chat_template.jinja"):
        if cand.is_file():
            template = cand.read_text()
            break
    if template is None:
        for cand in (d / "tokenizer_config.json", src / "tokenizer_config.json"):
            if cand.is_file():
                t = json.loads(cand.read_text()).get("chat_template")
                if isinstance(t, str):
                    template = t
                    break
    (out / "chat_template.jinja").write_text(template or CHAT_TEMPLATE)


# --------------------------------------------------------------------------- entry point
def import_checkpoint(src, out, family: str = "auto", tokenizer=None, force: bool = False, rules: str = "original",
                      shard_bytes: int = DEFAULT_SHARD_BYTES, log=print, allow_bin: bool = False) -> dict:
    """Import a HF-layout checkpoint directory into an edgemm checkpoint at `out`. -> a summary dict.
    allow_bin: read pickled pytorch_model*.bin shards (with torch.load(weights_only=True)); refused otherwise."""
    log = log or (lambda *_: None)
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise EdgemmError(f"{src} is not a directory")
    if not (src / "config.json").is_file():
        raise EdgemmError(f"{src} is not a Hugging Face checkpoint: config.json is missing")
    check_out(out, force)
    try:
        hf = json.loads((src / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise EdgemmError(f"{src / 'config.json'} is not valid JSON ({e})") from None
    fam = detect_family(hf, str(src / "config.json")) if family == "auto" else family
    if fam not in MAPPERS:
        raise EdgemmError(f"unknown family {family!r}; edgemm imports {', '.join(FAMILIES)}")
    source = Source(src, allow_bin=allow_bin)
    plan = MAPPERS[fam](hf, source, rules)
    plan.cfg.validate()
    shapes = check_plan(plan, source)
    tok_dir = Path(tokenizer) if tokenizer else None
    qformer_tok = None
    if plan.cfg.adapter.qformer_text:                 # InstructBLIP: the Q-Former's own tokenizer (edgemm.qformer)
        from ..qformer import QFORMER_TOKENIZER, import_tokenizer
        qformer_tok = import_tokenizer(src, tok_dir, plan.cfg)
    log(f"importing {src} as {fam}: {len(plan.entries)} edgemm tensors from {len(source.where)} source tensors "
        f"in {len(source.shards)} shard(s)")
    for n in plan.notes:
        log(f"note: {n}")
    reasons: dict[str, int] = {}
    for k, why in plan.ignored.items():
        if k in source.where:
            reasons[why] = reasons.get(why, 0) + 1
    for why, n in reasons.items():
        log(f"not imported: {n} tensor(s): {why}")
    with atomic_dir(out) as tmp:
        _install_tokenizer(src, tok_dir, tmp, log)
        if qformer_tok is not None:
            qformer_tok.save(tmp / QFORMER_TOKENIZER)
        files = stream_convert(plan, source, shapes, tmp, shard_bytes, log)
        plan.cfg.save(tmp / "config.json")
        summary = {"source": str(src.resolve()), "family": fam, "rules": rules if fam == "cogvlm" else None,
                   "variants": plan.cfg.variants(), "files": files, "tensors": len(plan.entries),
                   "not_imported": {k: v for k, v in plan.ignored.items() if k in source.where},
                   "notes": plan.notes}
        (tmp / "edgemm-import.json").write_text(json.dumps(summary, indent=2) + "\n")
    log(f"wrote {out} ({len(files)} weight file(s)); variants: {', '.join(plan.cfg.variants()) or 'none'}")
    return summary


def parse_size(s: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", str(s).lower())
    if not m:
        raise EdgemmError(f"cannot read the size {s!r} (e.g. 2GB, 500MB)")
    unit = m.group(2).rstrip("b").rstrip("i")
    return int(float(m.group(1)) * 1024 ** " kmgt".index(unit or " "))

