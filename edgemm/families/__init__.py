"""Model families: one module per family, registered by decorator (as llama.cpp's converter registers one class
per architecture). A family holds what is its own and nothing else:

- detection from a Hugging Face config.json (`model_types`, `architectures`, or its own `detect`);
- the mapping to edgemm blocks and the importer's tensor plan (`plan(hf, source, rules) -> Plan`, edgemm.families.base),
  which also carries the processor settings (image size, mean, std) into the config;
- the blocks it composes and the features its checkpoints use (`core`: always, `optional`: some), from which the
  targets that export it are derived (edgemm.blocks.support): `edgemm families`, the README's family table (tested);

Adding a family is one new module here plus its line in _MODULES (docs/architecture.md walks through one).
"""
from __future__ import annotations

import importlib
import json

from ..blocks import support
from ..errors import EdgemmError

# The family modules, imported on first use; the registration order is the detection order.
_MODULES = ("cogvlm", "libra", "llava", "blip2", "idefics", "llava_next_video", "llava_onevision", "internvl",
            "smolvlm", "xcomposer2", "qwen_vl", "fuyu", "llava_uhd", "llamavid", "llava_original", "omnifusion",
            "gemma3", "qwen2vl")
REGISTRY: dict[str, "Family"] = {}


class Family:
    """Base: subclass, set the class attributes, implement `plan`, decorate with @register."""
    name: str = ""
    model_types: tuple = ()             # config.json model_type values
    architectures: tuple = ()           # config.json architectures entries (lower case)
    source: str = ""                    # the transformers class or release layout (README table)
    computes: str = ""                  # what edgemm computes, in a few words (README table)
    blocks: tuple = ()                  # "role:kind" of the blocks it composes
    core: tuple = ()                    # features (edgemm.blocks.support) every import uses
    optional: tuple = ()                # features some imports use
    hints: dict = {}                    # target -> a note for the table (e.g. an import option it needs)
    stop: tuple = ()                    # stop strings of the release's chat format (Yi-VL: "###"): ModelConfig.tokens
    add_bos: bool | None = None         # whether prompts start with bos (None: as the tokenizer does; Fuyu: no)
    chat_template: str | None = None    # the chat format of a release whose tokenizer files ship none (its code has it)

    release_files: tuple = ()           # a release without config.json: the files that mark its folder (open_release)

    def open_release(self, src, allow_bin: bool = False):
        """A release folder without config.json (it holds every file of release_files) -> (the config dict plan()
        reads, its Source, the tokenizer folder or None); a family without one says so."""
        raise EdgemmError(f"the {self.name} family has no release layout without config.json")

    def detect(self, hf: dict) -> bool:
        mt = str(hf.get("model_type", "")).lower()
        archs = {str(a).lower() for a in hf.get("architectures") or []}
        return mt in self.model_types or bool(archs & set(self.architectures))

    def plan(self, hf: dict, src, rules: str = "original"):
        raise NotImplementedError

    def adapt_template(self, template: str, src) -> str:
        """The chat template as the import stores it (src: the source, edgemm.importers.shards.Source): a family
        whose template renders an image as something other than edgemm's <image> placeholder rewrites it."""
        return template

    def targets(self) -> str:
        return support.target_summary(list(self.core), list(self.optional), self.hints)


def register(cls):
    """Class decorator: registers one instance of a Family subclass under its name."""
    unknown = [f for f in (*cls.core, *cls.optional) if f not in support.BY_NAME]
    if unknown:
        raise ValueError(f"family {cls.name!r} names features the support matrix lacks: {unknown}")
    if not cls.name or cls.name in REGISTRY or cls.plan is Family.plan:
        raise ValueError(f"family {cls.name!r}: no name, registered twice, or no plan")
    REGISTRY[cls.name] = cls()
    return cls


def families() -> dict[str, Family]:
    for m in _MODULES:
        importlib.import_module(f"{__name__}.{m}")
    return REGISTRY


def names() -> tuple[str, ...]:
    return tuple(families())


def get(name: str) -> Family:
    fams = families()
    if name not in fams:
        raise EdgemmError(f"unknown family {name!r}; edgemm imports {', '.join(fams)}")
    return fams[name]


def release_family(src) -> "Family | None":
    """The family whose release layout (no config.json; Family.release_files) a folder holds, if any."""
    for fam in families().values():
        if fam.release_files and all((src / f).is_file() for f in fam.release_files):
            return fam
    return None


def detect(hf: dict, where: str = "config.json") -> str:
    """The registered family a config.json belongs to (the first that claims it, in registration order)."""
    for name, fam in families().items():
        if fam.detect(hf):
            return name
    mt = str(hf.get("model_type", "")).lower()
    raise EdgemmError(f"cannot tell the model family from {where} (model_type={mt or None!r}, "
                      f"architectures={hf.get('architectures')}); edgemm imports {', '.join(names())}: "
                      "pass --from if it is one of them")


def table() -> list[dict]:
    """One row per family: what `edgemm families` prints and the README's family table holds."""
    return [{"family": f.name, "source": f.source, "computes": f.computes, "blocks": list(f.blocks),
             "targets": f.targets()} for f in families().values()]


def readme_table() -> str:
    rows = ["| family (`--from`) | transformers class / source | what edgemm computes | targets |",
            "|---|---|---|---|"]
    rows += [f"| `{r['family']}` | {r['source']} | {r['computes']} | {r['targets']} |" for r in table()]
    return "\n".join(rows)


def matrix_lines() -> list[str]:
    """The support matrix as text: feature x target, with the block that computes each feature."""
    ts = support.TARGETS
    w = max(len(f.name) for f in support.FEATURES)
    out = [f"{'feature':<{w}}  {'block':<28}" + "".join(f"{t:>8}" for t in ts)]
    for f in support.FEATURES:
        cells = []
        for t in ts:
            if t == "gguf" and f.gguf:
                cells.append(f.gguf)
            elif f.computed_by(t):
                cells.append("fp" if t in ("onnx", "trt") and f.unquantized else "yes")
            else:
                cells.append("-")
        out.append(f"{f.name:<{w}}  {f.block:<28}" + "".join(f"{c:>8}" for c in cells))
    out += ["", "gguf: llava = computed by llama.cpp's llava graph (single branch + CLIP tower + MLP projector); "
                "edgemm's own family runs as llama.cpp's cogvlm, which has none of these features.",
            "gguf: onnx = the gguf bundle carries this vision stage as an ONNX graph (ONNX Runtime) beside llama.cpp's "
            "llama decoder; families marked 'vision stage in ONNX' get a gguf decoder this way.",
            "fp = unquantized precisions only (onnx fp32/fp16, trt fp16)."]
    return out


def describe(as_json: bool = False) -> str:
    if as_json:
        return json.dumps({"families": table(), "features": [
            {"name": f.name, "block": f.block, "targets": [t for t in support.TARGETS if f.computed_by(t)],
             "gguf": f.gguf, "unquantized_only": f.unquantized} for f in support.FEATURES]}, indent=2)
    rows = table()
    wf = max(len(r["family"]) for r in rows)
    wb = max(len(", ".join(r["blocks"])) for r in rows)
    out = [f"{'family':<{wf}}  {'blocks':<{wb}}  targets"]
    out += [f"{r['family']:<{wf}}  {', '.join(r['blocks']):<{wb}}  {r['targets']}" for r in rows]
    return "\n".join(out + ["", *matrix_lines()])
