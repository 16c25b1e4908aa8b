"""`edgemm import`: Hugging Face-layout checkpoints (CogVLM, Libra, LLaVA, LLaVA-NeXT, BLIP-2, InstructBLIP,
Idefics) -> edgemm checkpoints.

A source is a directory with config.json, the weights (safetensors shards + model.safetensors.index.json, a single
model.safetensors, or pytorch_model*.bin read with torch.load(weights_only=True)) and tokenizer files.

1. The family comes from config.json (model_type / architectures / auto_map) unless given: the registered families
   of edgemm.families, one module each.
2. The family's `plan` turns the config into an edgemm ModelConfig and a plan: every edgemm tensor with the source
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

from .. import families
from .shards import DEFAULT_SHARD_BYTES, Source, check_plan, stream_convert
from .tokenizer import install_tokenizer


# --------------------------------------------------------------------------- entry point
def import_checkpoint(src, out, family: str = "auto", tokenizer=None, force: bool = False, rules: str = "original",
                      shard_bytes: int = DEFAULT_SHARD_BYTES, log=print, allow_bin: bool = False) -> dict:
    """Import a HF-layout checkpoint directory into an edgemm checkpoint at `out`. -> a summary dict.
    allow_bin: read pickled pytorch_model*.bin shards (with torch.load(weights_only=True)); refused otherwise."""
    log = log or (lambda *_: None)
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise EdgemmError(f"{src} is not a directory")
    release = None if (src / "config.json").is_file() else families.release_family(src)
    if not (src / "config.json").is_file() and release is None:
        raise EdgemmError(f"{src} is not a Hugging Face checkpoint: config.json is missing")
    check_out(out, force)
    tok_dir = Path(tokenizer) if tokenizer else None
    if release is not None:     # a release without config.json (OmniFusion's parts and pickles): its family reads it
        hf, source, release_tok = release.open_release(src, allow_bin)
        fam, tok_dir = release.name if family == "auto" else family, tok_dir or release_tok
    else:
        try:
            hf = json.loads((src / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise EdgemmError(f"{src / 'config.json'} is not valid JSON ({e})") from None
        fam = families.detect(hf, str(src / "config.json")) if family == "auto" else family
        source = Source(src, allow_bin=allow_bin)
    mapper = families.get(fam)                        # an unknown name: the error lists the registered families
    plan = mapper.plan(hf, source, rules)
    plan.cfg.validate()
    shapes = check_plan(plan, source)
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
        plan.cfg.tokens = install_tokenizer(src, tok_dir, tmp, log, plan.cfg.decoder.vocab_size,
                                            lambda t: mapper.adapt_template(t, source), mapper.chat_template)
        if mapper.add_bos is not None:              # the family's processor decides (Fuyu: <s> after the image)
            plan.cfg.tokens.add_bos = mapper.add_bos
        plan.cfg.tokens.stop = list(mapper.stop)
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

