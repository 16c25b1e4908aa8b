"""llama.cpp importance matrices from edgemm's calibration statistics (issue 33).

llama.cpp's k-quants (and q4_0 / iq types) take an importance matrix: per input column of each weight matrix, the
mean of x_j^2 over the rows the matrix multiplied (tools/imatrix collects the sums over a text file; tools/quantize
loads them and divides by the row counts). Here the sums come from the calibration set as the exported stages see it
(edgemm.calib.stats: every Linear's input, per stage and modality branch, and `count`). They are the sums of the
inputs as ggml's CPU kernels multiply a K-quant's weights: each row rounded to Q8_K, one int8 scale a run of 256
inputs (`sum2_q8k`, calib.stats.q8k_round), not of the float inputs llama-imatrix sums (`sum2`, used for tensors
whose rows are not runs of 256, and for older statistics). The two differ where it matters: beside an activation
outlier a run's small inputs round to few levels (often 0), so a column whose float activations are small still
carries the rounding's noise, which the float sums do not weigh. On the outlier model (benchmarks/bench_gguf_imatrix.py)
the Q8_K sums lowered the GGUF check's fidelity KL (0.54 -> 0.23, llama.cpp; one position of 30 at KL 13 -> 4.8);
the emulated accuracy on 200 questions is the same with either sums (0.955; without a matrix 0.900). So the vision
branch's tensors (blk.N.vis_*) are weighted by image rows and the text branch's by text rows; a tensor both read
(the LM head, a single-branch LLaVA decoder's layers) gets both sums added, as llama-imatrix running both would.

The file is llama.cpp's GGUF imatrix format (tools/imatrix/imatrix.cpp save_imatrix): general.type "imatrix",
imatrix.datasets / chunk_count / chunk_size, and per tensor `<name>.in_sum2` (F32, ne [n_in, 1]) and `<name>.counts`
(F32, ne [1, 1]). read_imatrix normalises it as tools/quantize's load_imatrix does (in_sum2 / counts), and
gguf_quant.quantize_decoder hands the result to llama_model_quantize as its C array of llama_model_imatrix_data
(null-terminated; llama.h since the quantize params became typed), with the quantize.imatrix.* keys the quantize
tool writes into the quantized file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgemm.errors import EdgemmError

IMATRIX_FILE = "imatrix.gguf"
KQUANTS = ("q4_k_m", "q5_k_m", "q6_k")            # the precisions that take the importance matrix by default


def tensor_names(module: str, arch: str) -> list[str]:
    """The GGUF tensors (gguf_tensors.write_decoder's names) whose matmul input is `module`'s input."""
    if module == "decoder.lm_head":
        return ["output.weight"]
    parts = module.split(".")
    if len(parts) != 5 or parts[:2] != ["decoder", "layers"]:
        return []                                        # (MoE routers / experts, cross-attention: not matched)
    from edgemm.export.gguf_archs import DECODER_ARCHS
    i, branch, kind = parts[2], parts[3], parts[4]
    return [f"blk.{i}.{n}.weight" for n in DECODER_ARCHS[arch].tensor_names(branch).get(kind, [])]


def imatrix_entries(stats, arch: str, q8k: bool = True) -> dict:
    """{GGUF tensor name: (sum of x^2 per input column [n_in] float64, x as ggml's kernels round it where the
    statistics have it (q8k=False: the float inputs' sums, as llama-imatrix), rows)} from the decoder stages'
    statistics."""
    out: dict = {}
    for v in stats.layers.values():
        sums = v.sum2 if v.sum2_q8k is None or not q8k else v.sum2_q8k
        if not v.stage.startswith("decoder_") or sums is None:
            continue
        for name in tensor_names(v.module, arch):
            s, n = out.get(name, (0.0, 0))
            out[name] = (np.asarray(sums, np.float64) + s, n + int(v.count))
    if not out and any(v.stage.startswith("decoder_") for v in stats.layers.values()):
        raise EdgemmError("these calibration statistics have no sums of squares (version 1): collect them again "
                          "(`edgemm calibrate --refresh`) for an importance matrix")
    return out


def write_imatrix(path: Path, entries: dict, datasets: list[str], chunks: int) -> Path:
    """llama.cpp's GGUF imatrix file (see the module docstring). chunks: how many calibration samples."""
    import gguf
    w = gguf.GGUFWriter(str(path), arch="imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", list(datasets))
    rows = max((n for _, n in entries.values()), default=0)
    w.add_uint32("imatrix.chunk_count", int(chunks))
    w.add_uint32("imatrix.chunk_size", int(-(-rows // max(chunks, 1))))
    for name in sorted(entries):
        s, n = entries[name]
        w.add_tensor(f"{name}.in_sum2", np.asarray(s, np.float32).reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.array([[n]], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def read_imatrix(path: Path) -> tuple[dict, dict]:
    """-> ({tensor: mean x^2 per input column (float32), as tools/quantize's load_imatrix normalises: in_sum2 /
    counts per matrix, 1 where a count is 0}, {datasets, chunk_count, entries}). Refuses a file that is not one."""
    import gguf
    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:
        raise EdgemmError(f"{path} is not a GGUF imatrix file ({e})") from None
    f = r.fields
    if "imatrix.chunk_count" not in f:
        raise EdgemmError(f"{path} is not a GGUF imatrix file (no imatrix.chunk_count)")
    t = {x.name: np.asarray(x.data, np.float32) for x in r.tensors}
    out = {}
    for name, s in t.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        c = t.get(base + ".counts")
        if c is None:
            raise EdgemmError(f"{path}: {base} has sums and no counts")
        c = c.reshape(-1)
        s = s.reshape(len(c), -1)
        out[base] = np.where(c[:, None] > 0, s / np.maximum(c[:, None], 1), 1.0).astype(np.float32).reshape(-1)
    ds = f.get("imatrix.datasets")
    datasets = [bytes(ds.parts[i]).decode() for i in ds.data] if ds is not None else []
    meta = {"datasets": datasets, "chunk_count": int(f["imatrix.chunk_count"].parts[-1][0]), "entries": len(out)}
    return out, meta


def imatrix_params(values: dict, meta: dict, file_name: str):
    """ctypes arrays for llama_model_quantize_params: (imatrix array, kv_overrides array, keep-alive list)."""
    import ctypes
    from llama_cpp import llama_cpp as L
    keep = []
    arr = (L.llama_model_imatrix_data * (len(values) + 1))()
    for i, (name, v) in enumerate(sorted(values.items())):
        buf, nm = np.ascontiguousarray(v, np.float32), name.encode()
        keep += [buf, nm]
        arr[i].name = nm
        arr[i].data = buf.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        arr[i].size = buf.size
    arr[len(values)].name = None                                     # the terminator
    kvs = (L.llama_model_kv_override * 5)()
    items = [("quantize.imatrix.file", file_name), ("quantize.imatrix.dataset", (meta["datasets"] or [""])[-1]),
             ("quantize.imatrix.entries_count", len(values)), ("quantize.imatrix.chunks_count", meta["chunk_count"])]
    for o, (k, val) in zip(kvs, items):
        o.key = k.encode()
        if isinstance(val, str):
            o.tag = L.LLAMA_KV_OVERRIDE_TYPE_STR
            o.value.val_str = val.encode()[:127]
        else:
            o.tag = L.LLAMA_KV_OVERRIDE_TYPE_INT
            o.value.val_i64 = int(val)
    keep += [arr, kvs]
    return arr, kvs, keep
