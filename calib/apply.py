"""Quantize the stages of a bundle being exported (called by the ONNX exporter after the fp32 graphs are written
and before validation). One precision per stage group: `vision` -> the vision stage, `decoder` -> both decoder
stages (each calibrated on its own modality's rows)."""
from __future__ import annotations

from pathlib import Path

from .recipes import QUANTIZED

def quantize_bundle_stages(bundle_dir, stages: dict, precision: dict, model, tokenizer, calib=None, stats=None,
                           keep_sensitive: float | None = None, model_digest: str | None = None, log=print,
                           recipes: dict | None = None) -> dict:
    """Quantize, in place, every stage of `bundle_dir` whose group precision is quantized.

    `stages` is the exporter's manifest `stages` dict (updated: precision, weights, quantization record).
    Returns the manifest's `calibration` entry (or {} when nothing needed statistics).
    """
    from edgemm.calib.recipes import group            # a stage's --precision group
    from .quantize import quantize_stage
    from .recipes import CALIBRATED_RECIPE, PREFILL_RECIPE, PREFILL_STAGES, get_recipe
    from .stats import Stats, collect_stats
    log = log or (lambda s: None)
    bundle_dir = Path(bundle_dir)
    recipes = dict(recipes or {})          # stage or group ("vision" / "decoder") -> recipe name or Recipe
    for s in list(stages):
        if s not in recipes and group(s) in recipes:
            recipes[s] = recipes[group(s)]
    todo = {s: precision[group(s)] for s in stages if precision.get(group(s)) in QUANTIZED}
    for s, p in todo.items():        # the many-row stages' own form of the precision (recipes.PREFILL_RECIPE)
        if s not in recipes and s in PREFILL_STAGES and p in PREFILL_RECIPE:
            recipes[s] = PREFILL_RECIPE[p]
    if stats is not None and not isinstance(stats, Stats):
        stats = Stats.load(stats)
    if calib is not None or stats is not None:      # a calibration set given: the calibrated recipe by default
        for s, p in todo.items():
            name = CALIBRATED_RECIPE.get(p)
            name = name.get(group(s)) if isinstance(name, dict) else name
            if s not in recipes and name:
                r = get_recipe(name)
                if r.gptq and stats is not None and not any(v.xtx is not None for v in stats.stage(s).values()):
                    log(f"note: the statistics given have no Hessians (collect_stats(hessian=True)): {s} gets "
                        f"int4-awq instead of {r.name}")
                    r = get_recipe("int4-awq")
                recipes[s] = r.name
    if not todo:
        return {}
    need = any(get_recipe(recipes.get(s, p)).needs_stats for s, p in todo.items())
    hessian = any(get_recipe(recipes.get(s, p)).gptq for s, p in todo.items())
    if need and stats is None:
        stats = collect_stats((model, tokenizer), calib, model_digest=model_digest, log=log, hessian=hessian)
    for stage, p in todo.items():
        st = stages[stage]
        f = bundle_dir / st["file"]
        tmp = f.with_name(f.stem + ".quant.onnx")
        # s8s8, as TensorRT takes it and the fastest on CPUs with VNNI; the ort backend converts it to u8u8 (the
        # same numbers) at load on x86 CPUs without VNNI, where the s8s8 kernels saturate
        rec = quantize_stage(f, tmp, stage, p, stats=stats, keep_sensitive=keep_sensitive, log=log,
                             recipe=recipes.get(stage), int8_storage="s8s8")
        for extra in st.get("extra_files", []):
            (bundle_dir / extra).unlink(missing_ok=True)
        tmp.replace(f)
        data = tmp.with_name(tmp.name + ".data")
        if data.exists():
            data.replace(f.with_name(f.name + ".data"))
            st["extra_files"] = [f.name + ".data"]
        else:
            st.pop("extra_files", None)
        st["precision"] = p
        st["weights"] = rec["recipe_text"]
        st["quantization"] = {k: rec[k] for k in ("recipe", "int8_storage", "quantized", "kept", "bytes_before",
                                                  "bytes_after", "opset", "layers")}
    if stats is None:
        return {}
    return {"set": stats.meta.get("set"), "set_digest": stats.meta.get("set_digest"),
            "samples": stats.meta.get("samples"), "stats_digest": stats.meta.get("digest"),
            "mode": "shared" if any(get_recipe(recipes.get(s, p)).shared_scale for s, p in todo.items())
            else stats.meta.get("mode", "per-modality"),                   # (int8-shared: one scale for both)
            "stats_file": str(stats.path) if stats.path else None}
