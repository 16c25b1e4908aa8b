"""The shared shard reader and writer: source checkpoints (safetensors shards, an index, or .bin files read with
torch.load(weights_only=True)) opened one shard at a time, the plan checked against them, and the output
streamed into pre-planned safetensors shards."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from ..config import ModelConfig
from ..errors import EdgemmError

from ..families.base import Plan

DEFAULT_SHARD_BYTES = 2 * 1024 ** 3
# A memory-mapped shard's pages count as resident once touched: the mapping is dropped and re-opened after this
# many bytes were read from it, so resident memory stays bounded even for shards larger than RAM.
REMAP_BYTES = 256 * 1024 ** 2
_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}



# --------------------------------------------------------------------------- source
class Source:
    """The tensors of a HF checkpoint directory: names, shapes, dtypes and which shard holds each."""

    def __init__(self, path: Path, allow_bin: bool = False):
        self.path = path
        self.where: dict[str, str] = {}
        self.shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, str] = {}
        self.kind = "safetensors"
        self.allow_bin, self.kinds = allow_bin, {}          # kinds: merged shards' own (Source.merge)
        self.prefixes: dict[str, str] = {}                  # merged shards' name prefixes (Source.merge)
        p = path
        if (p / "model.safetensors.index.json").is_file():
            wm = self._index(p / "model.safetensors.index.json")
        elif (p / "model.safetensors").is_file():
            wm = None
            self.shards = ["model.safetensors"]
        elif (p / "pytorch_model.bin.index.json").is_file():
            wm, self.kind = self._index(p / "pytorch_model.bin.index.json"), "bin"
        elif (p / "pytorch_model.bin").is_file():
            wm, self.kind, self.shards = None, "bin", ["pytorch_model.bin"]
        else:
            raise EdgemmError(f"{p} holds no weights: expected model.safetensors(.index.json) or "
                              "pytorch_model.bin(.index.json)")
        if self.kind == "bin" and not allow_bin:
            raise EdgemmError(f"{p} holds pickled pytorch_model.bin weights, and unpickling a file can run code; "
                              "convert them to safetensors, or pass --allow-bin to read them with "
                              "torch.load(weights_only=True) if you trust where they come from")
        if wm is not None:
            self.shards = list(dict.fromkeys(wm[k] for k in sorted(wm, key=lambda k: (wm[k], k))))
            for shard in self.shards:
                if not (p / shard).is_file():
                    example = next(k for k, v in wm.items() if v == shard)
                    raise EdgemmError(f"shard {shard} is missing from {p} (it holds tensor {example}, among others)")
        for shard in self.shards:
            with self.open(shard) as f:
                for k in f.keys():
                    if wm is not None and wm.get(k) != shard:
                        if k not in wm:
                            raise EdgemmError(f"tensor {k} is in shard {shard} but not in the index")
                        continue
                    self.where[k] = shard
                    self.shapes[k], self.dtypes[k] = f.shape(k), f.dtype(k)
        if wm is not None:
            for k, shard in wm.items():
                if k not in self.where:
                    raise EdgemmError(f"tensor {k} is missing: the index puts it in {shard}, which lacks it")

    @staticmethod
    def _index(path: Path) -> dict:
        from ..safety import bare_file_name
        try:
            wm = json.loads(path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as e:
            raise EdgemmError(f"{path} is not a valid checkpoint index ({str(e)[:120]})") from None
        if not isinstance(wm, dict):
            raise EdgemmError(f"{path}: weight_map must map tensor names to shard files")
        for v in set(wm.values()) if all(isinstance(v, str) for v in wm.values()) else [None]:
            bare_file_name(v, str(path))
        return wm

    @classmethod
    def of_parts(cls, path: Path, parts: list, allow_bin: bool = False) -> "Source":
        """A checkpoint made of parts inside `path` (a release without one weights file: OmniFusion's), each
        (prefix, part): a Source (merged, its names prefixed) or a dict of in-memory tensors (read from a pickle)."""
        self = cls.__new__(cls)
        self.path, self.where, self.shapes, self.dtypes, self.shards = path, {}, {}, {}, []
        self.kind, self.allow_bin, self.kinds, self.prefixes = "parts", allow_bin, {}, {}
        for prefix, part in parts:
            if isinstance(part, Source):
                self.merge(part, prefix)
            else:
                self.add_tensors(prefix, {prefix + k: t for k, t in part.items() if hasattr(t, "shape")})
        return self

    def open(self, shard: str) -> "_Shard":
        kind = self.kinds.get(shard, self.kind)
        return kind if isinstance(kind, _Memory) else _Shard(self.path / shard, kind, self.prefixes.get(shard, ""))

    def merge(self, other: "Source", prefix: str = "") -> None:
        """Another folder's tensors (names prefixed with `prefix`), its shards by their path from this one's (a
        checkpoint whose vision tower is a CLIP checkpoint of its own: LLaVA's original layout, Yi-VL's vit/ folder,
        Libra's tokenizer CLIP; a release of parts: Source.of_parts)."""
        clash = sorted({prefix + k for k in other.where} & set(self.where))
        if clash:
            raise EdgemmError(f"tensor {clash[0]} is both in {self.path} and in {other.path}")
        rel = other.path.resolve().relative_to(self.path.resolve())
        for k, shard in other.where.items():
            self.where[prefix + k] = str(rel / shard)
            self.shapes[prefix + k], self.dtypes[prefix + k] = other.shapes[k], other.dtypes[k]
        for shard in other.shards:
            self.shards.append(str(rel / shard))
            self.kinds[str(rel / shard)] = other.kinds.get(shard, other.kind)
            self.prefixes[str(rel / shard)] = prefix + other.prefixes.get(shard, "")

    def add_tensors(self, name: str, tensors: dict) -> None:
        """Tensors already in memory (read from a pickle: Libra's vqgan.ckpt) as one pseudo-shard `name`."""
        clash = sorted(set(tensors) & set(self.where))
        if clash:
            raise EdgemmError(f"tensor {clash[0]} is both in {self.path} and in {name}")
        self.shards.append(name)
        self.kinds[name] = _Memory(tensors)
        for k, t in tensors.items():
            self.where[k], self.shapes[k], self.dtypes[k] = name, tuple(t.shape), str(t.dtype).replace("torch.", "")

    def read(self, name: str):
        """One tensor (small reads while planning, e.g. checking that a bias is all zeros)."""
        with self.open(self.where[name]) as f:
            return f.get(name)


class _Memory:
    """An in-memory pseudo-shard (Source.add_tensors) behind _Shard's interface."""

    def __init__(self, tensors: dict):
        self.d, self.kind = tensors, "memory"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def keys(self):
        return list(self.d)

    def shape(self, k):
        return tuple(self.d[k].shape)

    def dtype(self, k):
        return str(self.d[k].dtype).replace("torch.", "")

    def get(self, k):
        return self.d[k]


def load_pickle(path: Path) -> dict:
    """A torch.save'd module or dict -> {dotted name: tensor, dotted name of a number: the number} (a module's
    parameters and buffers by their state-dict names, its int / float attributes such as num_heads and eps; a
    Lightning checkpoint's tensors as state_dict.<name>). torch.load(weights_only=True) with every global the
    pickle names mapped to an inert class, so nothing in the file runs."""
    import torch

    class Inert:
        def __init__(self, *a, **k):
            pass

        def __setstate__(self, state):
            if isinstance(state, dict):
                self.__dict__.update(state)

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        with torch.serialization.safe_globals([(Inert, n) for n in names]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise EdgemmError(f"{path} cannot be read as a torch.save file ({str(e).splitlines()[0][:160]})") from None
    out: dict = {}

    def walk(o, pre, depth=0):
        if depth > 32:
            raise EdgemmError(f"{path}: nested too deeply")
        if isinstance(o, torch.Tensor):
            out[pre[:-1]] = o.detach()
        elif isinstance(o, (int, float)) and not isinstance(o, bool):
            out[pre[:-1]] = o
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{pre}{k}.", depth + 1)
        elif isinstance(o, Inert):
            d = o.__dict__
            for part in ("_parameters", "_buffers", "_modules"):
                walk({k: v for k, v in (d.get(part) or {}).items() if v is not None}, pre, depth + 1)
            walk({k: v for k, v in d.items() if not k.startswith("_") and isinstance(v, (int, float))}, pre, depth + 1)
    walk(obj, "")
    return out


class _Shard:
    """A context manager over one shard: safe_open (memory-mapped) or a weights-only mmapped torch.load."""

    def __init__(self, path: Path, kind: str, prefix: str = ""):
        self.path, self.kind, self.prefix = path, kind, prefix     # prefix: a merged part's names (Source.merge)
        self.touched = 0

    def __enter__(self):
        if self.kind == "safetensors":
            from safetensors import safe_open
            from ..safety import check_safetensors
            check_safetensors(self.path)
            try:
                self.f = safe_open(str(self.path), framework="pt")
            except Exception as e:
                raise EdgemmError(f"{self.path} is not a readable safetensors file ({e})") from None
        else:
            import torch
            try:
                self.d = torch.load(str(self.path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise EdgemmError(f"{self.path} cannot be read with torch.load(weights_only=True) ({e})") from None
        return self

    def __exit__(self, *exc):
        self.f = self.d = None      # drops the mapping

    def keys(self):
        return list(self.f.keys()) if self.kind == "safetensors" else list(self.d)

    def shape(self, k):
        return tuple(self.f.get_slice(k).get_shape()) if self.kind == "safetensors" else tuple(self.d[k].shape)

    def dtype(self, k):
        if self.kind == "safetensors":
            return _ST_DTYPES.get(self.f.get_slice(k).get_dtype(), self.f.get_slice(k).get_dtype())
        return str(self.d[k].dtype).replace("torch.", "")

    def get(self, k):                           # k: the source's name (a merged part's: with its prefix)
        k = k[len(self.prefix):]
        if self.kind != "safetensors":
            return self.d[k]
        t = self.f.get_tensor(k)
        self.touched += t.numel() * t.element_size()
        if self.touched > REMAP_BYTES:            # drop the touched pages of the mapping: map it afresh
            self.f, self.touched = None, 0
            self.__enter__()
        return t


# --------------------------------------------------------------------------- checks
def _expected_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    import torch
    from ..model import EdgeMM
    with torch.device("meta"):
        m = EdgeMM(cfg)
    out = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    if cfg.decoder.tie_embeddings:
        out.pop("decoder.lm_head.weight", None)
    return out


def check_plan(plan: Plan, src: Source) -> dict[str, tuple]:
    """Unexpected / missing tensors and shapes, before anything is written. -> edgemm name: shape."""
    import torch
    used = {s for e in plan.entries for s in e.sources}
    for e in plan.entries:
        for s in e.sources:
            if s not in src.where:
                raise EdgemmError(f"tensor {s} is missing from the checkpoint (edgemm's {e.name} is made from it)")
    unexpected = sorted(set(src.where) - used - set(plan.ignored))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise EdgemmError(f"unexpected tensor {unexpected[0]}{more}: not part of the {plan.cfg.name!r} layout "
                          "that config.json describes")
    expected = _expected_shapes(plan.cfg)
    names = [e.name for e in plan.entries]
    if len(set(names)) != len(names):
        raise EdgemmError("internal: the import plan writes a tensor twice")
    missing = sorted(set(expected) - set(names))
    if missing:
        raise EdgemmError(f"no source tensor for edgemm's {missing[0]}: the checkpoint lacks part of the model")
    shapes = {}
    for e in plan.entries:
        if e.name not in expected:
            raise EdgemmError(f"internal: the import plan writes {e.name}, which the model does not have")
        metas = [torch.empty(src.shapes[s], device="meta") for s in e.sources]
        desc = ", ".join(f"{s} {tuple(src.shapes[s])}" for s in e.sources)
        try:
            got = tuple(e.build(metas).shape) if e.sources else expected[e.name]
        except Exception:
            got = None
        if got != expected[e.name]:
            if len(e.sources) == 1:
                raise EdgemmError(f"tensor {e.sources[0]} has shape {tuple(src.shapes[e.sources[0]])}; config.json "
                                  f"implies {expected[e.name]} for edgemm's {e.name}")
            raise EdgemmError(f"tensors {desc} do not make edgemm's {e.name} of shape {expected[e.name]} "
                              "that config.json implies")
        shapes[e.name] = got
    return shapes


# --------------------------------------------------------------------------- streaming writer
class ShardedWriter:
    """Pre-planned safetensors shards written tensor by tensor (headers first, so nothing is buffered)."""

    def __init__(self, out: Path, order: list[str], shapes: dict, shard_bytes: int):
        self.out, self.shapes = out, shapes
        self.shards: list[list[str]] = [[]]
        size = 0
        for n in order:
            nb = 4 * _numel(shapes[n])
            if self.shards[-1] and size + nb > shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append(n)
            size += nb
        k = len(self.shards)
        self.files = ["model.safetensors"] if k == 1 else \
            [f"model-{i + 1:05d}-of-{k:05d}.safetensors" for i in range(k)]
        self.total = sum(4 * _numel(s) for s in shapes.values())
        self._i, self._j, self._f = 0, 0, None

    def _open(self):
        names = self.shards[self._i]
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for n in names:
            nb = 4 * _numel(self.shapes[n])
            header[n] = {"dtype": "F32", "shape": list(self.shapes[n]), "data_offsets": [off, off + nb]}
            off += nb
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        self._f = open(self.out / self.files[self._i], "wb")
        self._f.write(struct.pack("<Q", len(h)) + h)

    def write(self, name: str, t) -> None:
        import torch
        if self._f is None:
            self._open()
        want = self.shards[self._i][self._j]
        if name != want:
            raise RuntimeError(f"internal: writer expected {want}, got {name}")
        t = t.detach().to(torch.float32).contiguous()
        if tuple(t.shape) != tuple(self.shapes[name]):
            raise EdgemmError(f"tensor {name}: converted shape {tuple(t.shape)} != {self.shapes[name]}")
        if t.numel():
            self._f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._j += 1
        if self._j == len(self.shards[self._i]):
            self._f.close()
            self._f, self._i, self._j = None, self._i + 1, 0

    def finish(self) -> list[str]:
        if self._i != len(self.shards):
            raise RuntimeError("internal: not every planned tensor was written")
        if len(self.files) > 1:
            wm = {n: f for f, names in zip(self.files, self.shards) for n in names}
            (self.out / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": self.total}, "weight_map": wm}, indent=2) + "\n")
        return self.files


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def stream_convert(plan: Plan, src: Source, shapes: dict, out_dir: Path, shard_bytes: int, log=None) -> list[str]:
    """Source shards one at a time; every entry is built and written as soon as its last source shard is open."""
    shard_ix = {s: i for i, s in enumerate(src.shards)}
    ready = {e.name: max((shard_ix[src.where[s]] for s in e.sources), default=0) for e in plan.entries}
    entries = sorted(plan.entries, key=lambda e: ready[e.name])           # stable: plan order within a shard
    writer = ShardedWriter(out_dir, [e.name for e in entries], shapes, shard_bytes)
    need_later: dict[int, set] = {}
    for e in entries:
        for s in e.sources:
            i = shard_ix[src.where[s]]
            if i < ready[e.name]:
                need_later.setdefault(i, set()).add(s)
    pending: dict[str, object] = {}
    k = 0
    for i, shard in enumerate(src.shards):
        with src.open(shard) as f:
            for s in sorted(need_later.get(i, ())):
                pending[s] = f.get(s).clone()          # a recipe straddling shards: keep only its own pieces
            while k < len(entries) and ready[entries[k].name] == i:
                e = entries[k]
                ts = [pending.pop(s) if s in pending else f.get(s) for s in e.sources]
                writer.write(e.name, e.build(ts))
                del ts
                k += 1
        if log:
            log(f"  {shard}: done ({i + 1}/{len(src.shards)})")
    return writer.finish()


