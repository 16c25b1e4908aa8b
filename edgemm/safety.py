"""Checks that run before a file we did not make reaches a parser that can crash or escape: GGUF headers before
llama.cpp, ONNX external-data locations before onnx / ONNX Runtime.

Both read with hard limits, in bounded time and memory, and raise EdgemmError naming the field.
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

from .errors import EdgemmError

# GGUF limits (generous for real models: a 256k vocabulary, thousands of tensors, long chat templates)
MAX_TENSORS = 1 << 16
MAX_KV = 1 << 14
MAX_STRING = 16 << 20
MAX_ARRAY = 1 << 24
MAX_DIMS = 4
# GGUF value types -> struct format (gguf-py's GGUFValueType numbering)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Reader:
    def __init__(self, f, size: int, where: str):
        self.f, self.size, self.where, self.pos = f, size, where, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise EdgemmError(f"{self.where}: {what} runs past the end of the file (offset {self.pos}, "
                              f"{n} bytes, file {self.size}); not a valid GGUF")
        b = self.f.read(n)
        self.pos += n
        return b

    def scalar(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> bytes:
        n = self.scalar("Q", what + " length")
        if n > MAX_STRING:
            raise EdgemmError(f"{self.where}: {what} claims {n} bytes (limit {MAX_STRING}); refusing the file")
        return self.take(n, what)

    def value(self, vtype: int, key: str, depth: int = 0):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], f"value of {key}")
        if vtype == _STRING:
            return self.string(f"string value of {key}")
        if vtype == _ARRAY and depth == 0:
            etype = self.scalar("I", f"array type of {key}")
            n = self.scalar("Q", f"array length of {key}")
            if n > MAX_ARRAY:
                raise EdgemmError(f"{self.where}: array {key} claims {n} items (limit {MAX_ARRAY}); refusing the file")
            if etype in _SCALARS:
                width = struct.calcsize(_SCALARS[etype])
                if n * width > self.size - self.pos:
                    raise EdgemmError(f"{self.where}: array {key} ({n} items) runs past the end of the file")
                data = self.take(n * width, f"array {key}")
                return ("array", etype, n, data if n <= 16 else None)
            if etype == _STRING:
                if n * 8 > self.size - self.pos:
                    raise EdgemmError(f"{self.where}: array {key} ({n} strings) runs past the end of the file")
                for i in range(n):
                    self.string(f"item {i} of {key}")
                return ("array", etype, n, None)
            raise EdgemmError(f"{self.where}: array {key} has item type {etype}, which GGUF arrays here may not hold")
        raise EdgemmError(f"{self.where}: key {key} has an unknown value type {vtype}")


def check_gguf(path) -> dict:
    """Read a GGUF file's header with limits -> {"version", "tensors", "kv", "alignment"}; EdgemmError naming the
    field when anything is out of bounds: counts, string and array lengths, dimensions, element counts that
    overflow, tensor data outside the file, an alignment that is not a small power of two, tokenizer arrays of
    the wrong type or length."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    p = Path(path)
    where = str(p)
    try:
        size = p.stat().st_size
        f = open(p, "rb")
    except OSError as e:
        raise EdgemmError(f"cannot read {where}: {e.strerror or e}") from None
    with f:
        r = _Reader(f, size, where)
        if r.take(4, "magic") != b"GGUF":
            raise EdgemmError(f"{where} is not a GGUF file (bad magic)")
        version = r.scalar("I", "version")
        if version not in (2, 3):
            raise EdgemmError(f"{where}: GGUF version {version} is not supported (2 or 3)")
        n_tensors, n_kv = r.scalar("Q", "tensor count"), r.scalar("Q", "metadata count")
        if n_tensors > MAX_TENSORS:
            raise EdgemmError(f"{where}: the header claims {n_tensors} tensors (limit {MAX_TENSORS}); refusing the file")
        if n_kv > MAX_KV:
            raise EdgemmError(f"{where}: the header claims {n_kv} metadata keys (limit {MAX_KV}); refusing the file")
        kv, arrays = {}, {}
        for i in range(n_kv):
            key = r.string(f"metadata key {i}").decode("utf-8", "replace")
            if key in kv:
                raise EdgemmError(f"{where}: metadata key {key} appears twice")
            v = r.value(r.scalar("I", f"type of {key}"), key)
            kv[key] = v
            if isinstance(v, tuple):
                arrays[key] = v
        align = kv.get("general.alignment", 32)
        if not isinstance(align, int) or align < 1 or align > (1 << 20) or align & (align - 1):
            raise EdgemmError(f"{where}: general.alignment {align!r} is not a power of two up to 1 MiB")
        tok = arrays.get("tokenizer.ggml.tokens")
        if "tokenizer.ggml.tokens" in kv and (tok is None or tok[1] != _STRING):
            raise EdgemmError(f"{where}: tokenizer.ggml.tokens must be an array of strings")
        for k, etypes in (("tokenizer.ggml.scores", (6,)), ("tokenizer.ggml.token_type", (4, 5))):
            if k in kv:
                a = arrays.get(k)
                if a is None or a[1] not in etypes:
                    raise EdgemmError(f"{where}: {k} has the wrong type")
                if tok is not None and a[2] != tok[2]:
                    raise EdgemmError(f"{where}: {k} has {a[2]} items for {tok[2]} tokens")
        infos = []
        for i in range(n_tensors):
            name = r.string(f"tensor {i} name").decode("utf-8", "replace")
            nd = r.scalar("I", f"dimension count of {name}")
            if not 1 <= nd <= MAX_DIMS:
                raise EdgemmError(f"{where}: tensor {name} has {nd} dimensions (1 to {MAX_DIMS})")
            dims = [r.scalar("Q", f"dimension of {name}") for _ in range(nd)]
            ttype = r.scalar("I", f"type of {name}")
            offset = r.scalar("Q", f"data offset of {name}")
            n = 1
            for d in dims:
                if d < 1:
                    raise EdgemmError(f"{where}: tensor {name} has a dimension of {d}")
                n *= d
                if n >= 1 << 62:
                    raise EdgemmError(f"{where}: tensor {name}'s element count overflows")
            try:
                block, tsize = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (ValueError, KeyError):
                raise EdgemmError(f"{where}: tensor {name} has an unknown type {ttype}") from None
            if dims[0] % block:
                raise EdgemmError(f"{where}: tensor {name}'s first dimension {dims[0]} is not a multiple of its "
                                  f"block size {block}")
            if offset % align:
                raise EdgemmError(f"{where}: tensor {name}'s data offset is not aligned to {align}")
            infos.append((name, offset, n // block * tsize))
        data_start = (r.pos + align - 1) // align * align
        for name, offset, nbytes in infos:
            if data_start + offset + nbytes > size:
                raise EdgemmError(f"{where}: tensor {name}'s data (offset {offset}, {nbytes} bytes) lies outside "
                                  f"the file ({size} bytes)")
    return {"version": version, "tensors": n_tensors, "kv": n_kv, "alignment": align}


# --------------------------------------------------------------------------- ONNX external data
def unique_keys(message):
    """A json.loads object_pairs_hook that refuses a key given twice (Python keeps the last, a C parser may keep
    the first: an ambiguous file): EdgemmError(message(key))."""
    def hook(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise EdgemmError(message(next(k for k in keys if keys.count(k) > 1)))
        return dict(pairs)
    return hook


def check_onnx_external(path, root=None, data: bytes | None = None) -> None:
    """Every external-data `location` of an ONNX graph must be a relative path that stays inside `root` (default:
    the graph's directory): no `..` out, no absolute path, no symlink or hard link to a file elsewhere. Checked
    on the graph's protobuf (`data`: its bytes, already read) before onnx or ONNX Runtime reads any external file."""
    import mmap
    p = Path(path)
    root = Path(root or p.parent).resolve()
    if data is not None:
        if b"location" not in data:
            return
    else:
        try:                  # an external-data entry stores the key "location": a graph without it has none
            with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                if mm.find(b"location") < 0:
                    return
        except (OSError, ValueError):
            pass              # empty or unmappable: let the parse below say what it is
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors
    try:
        m = onnx.load_from_string(data) if data is not None else onnx.load(str(p), load_external_data=False)
    except Exception as e:      # a damaged protobuf
        raise EdgemmError(f"{p} is not a readable ONNX graph ({str(e).splitlines()[0][:120]})") from None
    for t in _get_all_tensors(m):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        loc = ExternalDataInfo(t).location
        if not loc or os.path.isabs(loc) or loc.startswith(("/", "\\")) or ".." in Path(loc).parts or ":" in loc:
            raise EdgemmError(f"{p}: tensor {t.name} keeps its data at {loc!r}, outside the bundle; refusing it")
        f = (root / loc)
        real = f.resolve()
        if not real.is_relative_to(root):
            raise EdgemmError(f"{p}: tensor {t.name}'s data file {loc!r} leads outside the bundle (a link); "
                              "refusing it")
        if f.is_symlink():
            raise EdgemmError(f"{p}: tensor {t.name}'s data file {loc!r} is a symbolic link; refusing it")
        if real.exists() and real.stat().st_nlink > 1:
            raise EdgemmError(f"{p}: tensor {t.name}'s data file {loc!r} is a hard link to another file; "
                              "refusing it")


# --------------------------------------------------------------------------- names inside a directory
def bare_file_name(name, where: str) -> str:
    """A shard index's file name: a plain name in the checkpoint directory (no directory part, no .., not
    absolute)."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or os.path.isabs(name) or "\0" in name:
        raise EdgemmError(f"{where}: {name!r} is not a plain file name in the checkpoint directory; refusing it")
    return name


def inside(root, rel, where: str) -> Path:
    """`rel` (a relative path from a user file) resolved inside `root`: no URL, no absolute path, no .., no link
    that leads out."""
    if not isinstance(rel, str) or not rel or "://" in rel or rel.startswith("file:") or os.path.isabs(rel) \
            or ".." in Path(rel).parts or "\0" in rel:
        raise EdgemmError(f"{where}: {rel!r} must be a path inside {root} (no URL, absolute path or ..)")
    root = Path(root).resolve()
    p = (root / rel).resolve()
    if not p.is_relative_to(root):
        raise EdgemmError(f"{where}: {rel!r} leads outside {root} (a link); refusing it")
    return p


# --------------------------------------------------------------------------- safetensors headers
ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_ST_HEADER = 100 << 20


def check_safetensors(path) -> int:
    """A safetensors file's header, bounded, before the library maps it: the header length inside the file,
    JSON without duplicate keys, known dtypes, shapes of non-negative ints whose byte size equals the entry's span,
    spans inside the data that cover it without overlaps or gaps. -> the number of tensors."""
    import json
    p = Path(path)
    where = str(p)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise EdgemmError(f"{where} is not a safetensors file (shorter than its header length)")
            n = struct.unpack("<Q", head)[0]
            if n > MAX_ST_HEADER or 8 + n > size:
                raise EdgemmError(f"{where}: the header claims {n} bytes (file {size}, limit {MAX_ST_HEADER})")
            raw = f.read(n)
    except OSError as e:
        raise EdgemmError(f"cannot read {where}: {e.strerror or e}") from None

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys(
            lambda key: f"{where}: the header names a tensor twice"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise EdgemmError(f"{where}: the header is not valid JSON") from None
    if not isinstance(header, dict):
        raise EdgemmError(f"{where}: the header is not a JSON object")
    data = size - 8 - n
    spans = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(e, dict) or e.get("dtype") not in ST_ITEMSIZE or not isinstance(e.get("shape"), list) \
                or not isinstance(e.get("data_offsets"), list) or len(e["data_offsets"]) != 2:
            raise EdgemmError(f"{where}: tensor {name!r} has a malformed entry")
        shape, (a, b) = e["shape"], e["data_offsets"]
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape) or \
                not all(isinstance(x, int) and not isinstance(x, bool) for x in (a, b)):
            raise EdgemmError(f"{where}: tensor {name!r} has a bad shape or offsets")
        nbytes = ST_ITEMSIZE[e["dtype"]]
        for d in shape:
            nbytes *= d
            if nbytes > data:
                break
        if not 0 <= a <= b <= data or b - a != nbytes:
            raise EdgemmError(f"{where}: tensor {name!r} spans bytes {a}..{b} of {data}, but its shape and dtype "
                              f"need {nbytes}")
        spans.append((a, b, name))
    pos = 0
    for a, b, name in sorted(spans):
        if a != pos:
            raise EdgemmError(f"{where}: tensor {name!r} " + ("overlaps the one before it" if a < pos else
                              "leaves a gap before it") + " in the data")
        pos = b
    if pos != data:
        raise EdgemmError(f"{where}: {data - pos} bytes of data are not any tensor's")
    return len(spans)
