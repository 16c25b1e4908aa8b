"""`edgemm bench`: what each bundle x backend costs and what it loses (docs/architecture.md, section 9).

For each bundle and backend, in a fresh child process (so peak memory is its own): size on disk, peak
resident memory, vision-stage latency, time to first token (vision + prefill of bos, image, question), decode
tokens/s (medians over repeats, after warm-up), accuracy on the shapes test split (edgemm.evaluate.evaluate,
what `edgemm eval` computes), and fidelity to the fp32 reference: top-1 next-token agreement and mean
KL(reference || variant) over a fixed prompt set (shapes `val` split: bos, image, question, then the
reference's greedy answer teacher-forced). Decode speed is also compared with the roofline: memory bandwidth
measured now (a 512 MB torch sum on all threads) / bytes of weights one decode step reads.

Writes bench.json (figures + machine, threads, library versions), bench.csv and bench.png (latency against
accuracy, Pareto front marked; latency alone, a bar per bundle, when accuracy was not measured: --limit 0).
"""
from __future__ import annotations

import csv
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from .cpu import threads_or_default
from .errors import EdgemmError

FIDELITY_PROMPTS = 32
FIDELITY_STEPS = 8


# --------------------------------------------------------------------------- machine
def measure_bandwidth(mb: int = 512, repeats: int = 5, threads: int | None = None) -> float:
    """Memory read bandwidth (bytes/s): median time of summing a `mb` MB float32 tensor with all threads."""
    import torch
    if threads:
        torch.set_num_threads(threads)
    x = torch.ones(mb * 2**20 // 4, dtype=torch.float32)
    x.sum()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t)
    return x.numel() * 4 / float(np.median(ts))


def machine_info(threads: int) -> dict:
    from .bundle import tool_versions
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cores": os.cpu_count(), "threads": threads,
            "versions": tool_versions("onnx", "onnxruntime", "onnxruntime-gpu", "gguf", "llama_cpp_python",
                                      "tensorrt", "matplotlib", "psutil", "tokenizers", "safetensors")}
    from .doctor import facts
    info["doctor"] = facts()              # CPU flags, llama.cpp variant, providers, GPU: what `edgemm doctor` prints
    try:
        import psutil
        info["memory_gb"] = round(psutil.virtual_memory().total / 1e9, 1)
    except ImportError:
        pass
    try:
        import torch
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return info


# --------------------------------------------------------------------------- bundle facts
def dir_size(path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def decode_weight_bytes(bundle, cpu: bool = False) -> int | None:
    """Bytes of weights one decode step reads: the decoder_text graph's initializers (onnx) or the decoder
    GGUF's text-branch + shared tensors, with one row of the token embedding table instead of all of it."""
    from .bundle import bundle_path, read_manifest
    man = read_manifest(bundle)
    st = man.get("stages", {}).get("decoder_text")
    dec = man.get("model", {}).get("decoder", {})
    # MoE: a decode step reads top_k of n_experts stacked experts (3-D initializers / *_exps tensors); the dense
    # standard-op form (trt bundles, onnx moe_form="dense") computes, so reads, every expert
    sparse = dec.get("n_experts") and (st or {}).get("moe", {}).get("form", "ort-moe") != "dense"
    expert_share = dec["experts_top_k"] / dec["n_experts"] if sparse else 1.0
    if man.get("target") in ("onnx", "trt") and st:
        import onnx
        from onnx import numpy_helper
        m = onnx.load(str(bundle_path(bundle, st["file"])), load_external_data=True)
        gathered = {n.input[0] for n in m.graph.node if n.op_type == "Gather"}
        # fp16 bundles store matrices as Cast(fp16 initializer); ONNX Runtime folds the Cast at load (on every
        # provider), so a decode step reads them as fp32: count what is read, not what is stored
        cast_src = {n.input[0]: n.output[0] for n in m.graph.node if n.op_type == "Cast"}
        # fp16 compute bundles (export --device cuda) read fp16 weights on CUDA; on the CPU provider ONNX Runtime
        # runs their MatMuls in fp32 behind casts and folds those weights to fp32 at load
        folded = {n.input[1] for n in m.graph.node if n.op_type == "MatMul"} if cpu and st.get("compute") == "fp16" \
            else set()
        total = 0
        for t in m.graph.initializer:
            n = int(np.prod(t.dims)) if t.dims else 1
            nbytes = len(t.raw_data) if t.raw_data else n * numpy_helper.to_array(t).itemsize
            name = t.name
            if name in cast_src and t.data_type == onnx.TensorProto.FLOAT16:
                nbytes *= 2
                name = cast_src[name]                 # what the graph reads is the Cast's output
            elif name in folded and t.data_type == onnx.TensorProto.FLOAT16:
                nbytes *= 2
            if (name in gathered or name.startswith("rotary.")) and len(t.dims) == 2:
                nbytes = nbytes // max(int(t.dims[0]), 1)      # one row (the rotary caches: a row per position)
            if len(t.dims) == 3 and ".experts." in name:
                nbytes = int(nbytes * expert_share)
            total += nbytes
        return total
    if man.get("target") == "gguf":
        try:
            import gguf
        except ImportError:
            return None
        from .export.gguf_tensors import branch_of
        for s in man.get("stages", {}).values():
            if not str(s.get("file", "")).endswith(".gguf"):
                continue                                         # an ONNX vision stage (vision.onnx)
            f = bundle_path(bundle, s["file"])
            r = gguf.GGUFReader(str(f))
            names = [t.name for t in r.tensors]
            if not any(n.startswith("blk.") for n in names):
                continue                                         # the mmproj
            total = 0
            for t in r.tensors:
                if branch_of(t.name) in ("vision branch", "vision stage"):   # blk.N.vis_*: never read decoding text
                    continue
                nb = int(t.n_bytes)
                if t.name.startswith("token_embd"):
                    nb //= max(int(t.shape[-1]) if len(t.shape) > 1 else 1, 1)
                if "_exps." in t.name:
                    nb = int(nb * expert_share)
                total += nb
            return total
    return None


# --------------------------------------------------------------------------- reference
def fidelity_prompts(n: int = FIDELITY_PROMPTS):
    from . import shapes
    return [(img, q.question) for img, q in shapes.make_split("val", n)]


def _prompt(backend, img, question):
    """bos, image, question -> (state, logits). Shared by every backend."""
    from .tilings import image_rows
    tok = backend.tokenizer
    rows = image_rows(backend, img)          # (tiled and packed for any-resolution models)
    st = backend.new_state(max_len=1 + rows.shape[1] + 64 + FIDELITY_STEPS)
    if tok.add_bos:
        backend.text(st, tok.prefix_ids())
    backend.image(st, rows)
    return st, np.array(backend.text(st, tok.user_turn(question, first=True)), np.float32)  # (copies: a backend
    # may return a view of a buffer that its next call reuses)


def reference_logits(reference: str, n: int = FIDELITY_PROMPTS, steps: int = FIDELITY_STEPS, progress=True):
    """The fp32 torch reference over the fixed prompt set: per prompt, the logits of the prompt's last row and
    of each teacher-forced step of its greedy answer (until </s>, at most `steps`)."""
    from tqdm import tqdm
    from .runtimes import load_backend
    b = load_backend("torch", model=reference, device="cpu")
    out = []
    for img, q in tqdm(fidelity_prompts(n), desc="reference", unit="prompt", disable=not progress, leave=False):
        st, logits = _prompt(b, img, q)
        seq, ls = [], [logits]
        for _ in range(steps):
            t = int(np.argmax(ls[-1]))
            seq.append(t)
            if b.tokenizer.is_eos(t):
                break
            ls.append(np.array(b.text(st, [t]), np.float32))
        out.append({"tokens": seq, "logits": np.stack(ls).astype(np.float32)})
    return out


def fidelity(backend, ref) -> dict:
    """Top-1 agreement and mean KL(reference || backend) of the next-token distributions."""
    def logsm(z):
        z = np.asarray(z, np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))
    agree, kls = [], []
    for (img, q), r in zip(fidelity_prompts(len(ref)), ref):
        st, logits = _prompt(backend, img, q)
        got = [logits]
        for t in r["tokens"][: len(r["logits"]) - 1]:
            got.append(np.array(backend.text(st, [t]), np.float32))
        got = np.stack(got)
        lp, lq = logsm(r["logits"]), logsm(got)
        kls += list((np.exp(lp) * (lp - lq)).sum(-1))
        agree += list(r["logits"].argmax(-1) == got.argmax(-1))
    return {"top1_agreement": float(np.mean(agree)), "mean_kl": float(np.mean(kls)), "positions": len(kls)}


# --------------------------------------------------------------------------- one bundle x backend (child)
CLIP_SIZE = (640, 360)      # --frames: each generated clip's frame size (the model's processor resizes it)


def input_label(inp) -> str | None:
    """A --images / --frames setting's name in the table: "672x336" (an image of that size), "8 frames"."""
    if inp is None:
        return None
    return f"{inp[1][0]}x{inp[1][1]}" if inp[0] == "image" else f"{inp[1]} frame{'s' * (inp[1] != 1)}"


MAX_SIDE, MAX_FRAMES = 16384, 4096       # --images / --frames: larger is a typo, refused in one line


def parse_inputs(images: str | None, frames: str | None) -> list | None:
    """--images "336x336,672x336" and --frames "1,4,8" -> [("image", (336, 336)), ..., ("frames", 1), ...] (None:
    neither given); a malformed or out-of-range value -> EdgemmError in one line."""
    out = []
    for part in (images.split(",") if images is not None else []):
        try:
            w, h = (int(x) for x in part.strip().lower().split("x"))
        except ValueError:
            raise EdgemmError(f"--images {images!r}: give sizes as WxH, comma-separated (e.g. 336x336,672x336)") \
                from None
        if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
            raise EdgemmError(f"--images: {part.strip()} is not a size from 1x1 to {MAX_SIDE}x{MAX_SIDE}")
        out.append(("image", (w, h)))
    for part in (frames.split(",") if frames is not None else []):
        try:
            n = int(part)
        except ValueError:
            raise EdgemmError(f"--frames {frames!r}: give frame counts, comma-separated (e.g. 1,4,8)") from None
        if not 0 < n <= MAX_FRAMES:
            raise EdgemmError(f"--frames: {n} is not a frame count from 1 to {MAX_FRAMES}")
        out.append(("frames", n))
    return out or None


class _Case:
    """One input setting of a bundle's timings: None (the shapes test image), ("image", (w, h)) (that image resized
    to w x h) or ("frames", n) (a generated clip the model's own sampling takes n frames of, as `run --video` takes
    it). encode() -> (rows: one array or a list of blocks, video flag or text) is what vision ms times: the host's
    path from the image or clip bytes to the rows (preprocessing, slicing / tiling, clip decoding and sampling, every
    vision-stage call); items() is the prompt as `edgemm run` feeds it (ChatSession: the chat template where the
    model has one, else bos, image, question)."""

    def __init__(self, backend, inp, decode_steps: int):
        from PIL import Image
        from . import shapes
        from .generation import ChatSession
        self.b, self.inp, self.steps, cfg = backend, inp, decode_steps, backend.cfg
        img, q = shapes.make_split("val", 1)[0]
        self.question, self.img, self.clip = q.question, img, None
        self.session = ChatSession(backend, log=None)
        if inp is None:
            return
        kind, val = inp
        if kind == "image":
            self.img = np.asarray(Image.fromarray(img).resize(val, Image.BILINEAR))
            return
        from .video import frame_hw, frame_rows, make_clip, takes_video
        v = takes_video(cfg)
        if self.session.template is None and not v.get("question"):
            raise EdgemmError("this model has no chat template that places a video (<video>); import it with one")
        n = sum(frame_rows(cfg, np.broadcast_to(np.float32(0), (val, 3, *frame_hw(cfg, *CLIP_SIZE)))))
        if n >= backend.context_length:
            raise EdgemmError(f"a clip of {val} frames takes {n} rows, but the context holds {backend.context_length}")
        self.clip = make_clip(val, *CLIP_SIZE, rate=v.get("fps") or 1, pattern=True)   # n frames at the model's rate

    def encode(self):
        from .qformer import instruction
        from .tilings import image_rows, preprocess_image
        b, cfg = self.b, self.b.cfg
        ins = instruction(b.tokenizer, cfg, self.question)          # () unless the vision stage reads the question
        if self.clip is None:
            if ins:                                                   # InstructBLIP: the rows read the question
                return b.vision(preprocess_image(self.img, cfg.vision), *ins), False
            return image_rows(b, self.img), False
        from .video import clip_pixel_rows, load_clip, question_rows
        v = cfg.vision.video
        own = v.get("frames")
        v["frames"] = self.inp[1]            # the model's sampling, asked for n frames of the n-frame clip
        try:
            px = load_clip(self.clip, cfg)
        finally:
            v["frames"] = own
        return (question_rows(b, px, ins), True) if v.get("question") else clip_pixel_rows(b, px)

    def items(self, rows, video) -> list:
        s, tok = self.session, self.b.tokenizer
        if s.template is None:
            return (list(tok.prefix_ids()) if tok.add_bos else []) + ["image"] + tok.user_turn(self.question, True)
        s.rows, s.video = rows, video
        return s._template_items([], self.question)

    def once(self) -> dict:
        b = self.b
        count = [0, 0]                       # vision inputs (images, slices, tiles, frames) through the tower

        def counted(f):
            def call(x, *a, **k):
                count[1] += 1
                if count[1] == 1:            # (the outermost call: a video stage may call the vision stage)
                    count[0] += int(np.shape(x)[0])
                try:
                    return f(x, *a, **k)
                finally:
                    count[1] -= 1
            return call
        own = {k: b.__dict__.get(k) for k in ("vision", "video")}
        b.vision, b.video = counted(b.vision), counted(b.video)
        try:
            t0 = time.perf_counter()
            rows, video = self.encode()
            t1 = time.perf_counter()
        finally:
            for k, f in own.items():         # (the methods again)
                if f is None:
                    delattr(b, k)
                else:
                    setattr(b, k, f)
        blocks = rows if isinstance(rows, list) else [rows]
        items = self.items(rows, video)
        n_rows = sum(x.shape[1] for x in blocks)
        prompt = n_rows + sum(t != "image" for t in items)
        if prompt + self.steps + 2 > b.context_length:
            raise EdgemmError(f"the prompt takes {prompt} rows ({n_rows} of the "
                              f"{input_label(self.inp) or 'image'}) + {self.steps} decode steps, but the context "
                              f"holds {b.context_length}")
        st = b.new_state(max_len=prompt + self.steps + 2)
        t1b = time.perf_counter()
        logits, i, k = None, 0, 0
        while i < len(items):                # runs of text ids; each "image" one block of rows
            if items[i] == "image":
                logits, i, k = b.image(st, blocks[k]), i + 1, k + 1
                continue
            j = i
            while j < len(items) and items[j] != "image":
                j += 1
            logits, i = b.text(st, items[i:j]), j
        t2 = time.perf_counter()
        t = int(np.argmax(logits))
        t3 = time.perf_counter()
        for _ in range(self.steps):
            t = int(np.argmax(b.text(st, [t])))
        t4 = time.perf_counter()
        return {"vision_s": t1 - t0, "ttft_s": (t1 - t0) + (t2 - t1b), "tok_s": self.steps / (t4 - t3),
                "image_rows": n_rows, "prompt_rows": prompt, "vision_inputs": count[0],
                "decode_context": prompt + self.steps / 2}


def _timings(backend, repeats: int, warmup: int, decode_steps: int, settings=((None, None),)) -> list[dict]:
    """Median vision / TTFT / decode figures, one dict per setting (max_tiles, input): max_tiles a tile budget of an
    any-resolution model (None: the bundle's own); input None (the shapes test image), ("image", (w, h)) or
    ("frames", n) (_Case); a bare max_tiles (an int or None) is that budget on the test image. Settings are measured
    in interleaved rounds; one the model refuses (EdgemmError) gets {"error": its line} and the others go on."""
    own = backend.cfg.vision.max_tiles
    settings = tuple(s if isinstance(s, tuple) else (s, None) for s in settings)
    cases, errors, runs = {}, {}, {s: [] for s in settings}
    for s in settings:
        try:
            cases[s] = _Case(backend, s[1], decode_steps)
        except EdgemmError as e:
            errors[s] = str(e)
    for r in range(warmup + repeats):
        for s, case in cases.items():
            if s in errors:
                continue
            try:
                _use_tiles(backend, s[0], own)
                x = case.once()
            except EdgemmError as e:
                errors[s] = str(e)
                continue
            if r >= warmup:
                runs[s].append(x)
    backend.cfg.vision.max_tiles = own
    res = []
    for s in settings:
        lab = {"max_tiles": own if s[0] is None else s[0], "input": input_label(s[1])}
        if s in errors:
            res.append({**lab, "error": errors[s]})
            continue
        x = runs[s]
        med = {k: float(np.median([y[k] for y in x])) for k in ("vision_s", "ttft_s", "tok_s")}
        img = cases[s].img
        ctx = x[0]["decode_context"]
        res.append({**lab, "vision_ms": 1e3 * med["vision_s"], "ttft_ms": 1e3 * med["ttft_s"],
                    "decode_tok_s": med["tok_s"], "decode_ms_per_token": 1e3 / med["tok_s"],
                    "image_rows": x[0]["image_rows"], "prompt_rows": x[0]["prompt_rows"],
                    "vision_inputs": x[0]["vision_inputs"],
                    "image_size": None if cases[s].clip is not None else f"{img.shape[1]}x{img.shape[0]}",
                    "decode_context": ctx, "kv_bytes_per_step": kv_bytes_per_step(backend, ctx)})
    return res


def kv_bytes_per_step(backend, context: float) -> int | None:
    """Bytes of KV cache one decode step reads at `context` rows: K and V of every layer, at the backend's KV type
    (ort / trt: the graphs' KV dtype; llamacpp: its cache type; torch: fp32). The roofline counts weights only;
    `roofline_kv_*` adds these (at bench-0.5b's ~290 rows an fp32 cache is about a third of the weights' bytes)."""
    c = backend.cfg.decoder
    runner = getattr(backend, "runner", None)
    if runner is not None and getattr(runner, "kv_type", None):
        from .llamacpp import KV_TYPES
        per = KV_TYPES[runner.kv_type][1]
    else:
        per = np.dtype(getattr(backend, "kv_dtype", np.float32)).itemsize
    if c.cross_attn_every:
        return None                         # (the image's cross K/V are read too: not counted here)
    return int(2 * c.n_layers * c.cache_heads * c.head_dim * context * per)


def _use_tiles(backend, setting, own) -> None:
    """Apply one --max-tiles setting (None: the bundle's own, `own`) to the backend's config."""
    from .tilings import set_max_tiles
    if setting is None:
        backend.cfg.vision.max_tiles = own
    else:
        set_max_tiles(backend.cfg, setting, getattr(backend, "manifest", None))


def _bench_one(job: dict) -> list | dict:
    """Runs in a child process: open, time, evaluate, compare; report peak RSS. -> a row per setting (a dict with
    "error" when the bundle does not open)."""
    import torch
    threads = job["threads"]
    torch.set_num_threads(threads)
    from .runtimes import load_backend
    res = {"bundle": job["bundle"], "backend_requested": job["backend"]}
    try:
        import psutil
        res["rss_before_open_mb"] = psutil.Process().memory_info().rss / 2**20
    except ImportError:
        pass
    notes = []
    try:
        b = load_backend(job["backend"], bundle=job["bundle"], device=job["device"], threads=threads,
                         log=notes.append, kv_cache=job.get("kv_cache"))
    except EdgemmError as e:
        res["error"] = str(e)
        return res
    res["backend"] = b.name
    res["on_device"] = b.device
    res["describe"] = b.describe()
    res["notes"] = notes
    # any-resolution models: tile budgets; --images / --frames: inputs; every pair a row, in interleaved rounds
    settings = [(t, i) for t in job.get("max_tiles") or (None,) for i in job.get("inputs") or (None,)]
    figures = _timings(b, job["repeats"], job["warmup"], job["decode_steps"], settings)
    out, own = [], b.cfg.vision.max_tiles
    ref = None
    if job.get("ref_file"):
        z = np.load(job["ref_file"], allow_pickle=False)
        ref = [{"tokens": list(z[f"t{i}"]), "logits": z[f"l{i}"]} for i in range(int(z["n"]))]
    quality = {}                     # accuracy and fidelity: the bundle's at a tile budget, whatever the input
    for (t, _), figs in zip(settings, figures):
        r = {**res, **figs}
        if "error" not in figs and t not in quality:
            quality[t] = q = {}
            _use_tiles(b, t, own)
            if job["limit"] != 0:
                from .evaluate import evaluate
                ev = evaluate(b, limit=job["limit"], progress=job["progress"])
                q.update(accuracy=ev["accuracy"], correct=ev["correct"], total=ev["total"],
                         accuracy_per_type={k: v["accuracy"] for k, v in ev["per_type"].items()})
            if ref is not None:
                q.update(fidelity(b, ref))
        if "error" not in figs:
            r.update(quality[t])
        r["peak_rss_mb"] = peak_rss_mb()
        out.append(r)
    return out


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM (per address space, so a spawned child does not inherit its
    parent's peak as getrusage's ru_maxrss does across exec), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _run_child(job: dict) -> dict:
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_bench_one, (job,))


# --------------------------------------------------------------------------- the bench
def bench(bundles, backends=("auto",), reference: str | None = None, limit: int | None = None,
          repeats: int = 5, warmup: int = 2, decode_steps: int = 32, threads: int | None = None,
          device: str = "auto", out: str | Path | None = None, fidelity_n: int = FIDELITY_PROMPTS,
          progress: bool = True, log=print, isolate: bool = True, max_tiles=None, kv_caches=(None,),
          inputs=None) -> dict:
    """Measure every bundle x backend; -> {"machine", "bandwidth_gb_s", "results": [...]}; writes
    bench.json / bench.csv / bench.png into `out` when given. limit: questions of the test split
    (None: all 1,000; 0: skip accuracy). reference: the fp32 reference model (default: each manifest's
    source model); fidelity_n=0 skips fidelity. kv_caches: llama.cpp KV types (--kv-cache), one row each (None:
    the backend's default). inputs (--images / --frames): ("image", (w, h)) and ("frames", n) settings, a row each
    per bundle x backend (vision ms, TTFT, decode tok/s at that input; _Case)."""
    import tempfile
    from tqdm import tqdm
    from .bundle import read_manifest
    log = log or (lambda s: None)
    if not bundles:
        raise EdgemmError("bench needs at least one bundle directory")
    threads = threads_or_default(threads)
    mans = {str(b): read_manifest(b) for b in bundles}
    machine = machine_info(threads)
    log(f"measuring memory bandwidth ({threads} threads) ...")
    bw = measure_bandwidth(threads=threads)
    log(f"bandwidth: {bw / 1e9:.1f} GB/s")
    tmpdir = Path(tempfile.mkdtemp(prefix="edgemm-bench-"))
    refs: dict[str, str | None] = {}
    ref_notes: dict[str, str] = {}
    for b, man in mans.items():
        src = reference or (man.get("reference") or {}).get("model") or (man.get("source") or {}).get("model")
        kind = (man.get("source") or {}).get("kind")
        if not reference and kind == "in-memory":
            src = None
            ref_notes[b] = "the bundle was exported from an in-memory model: pass --reference MODEL"
        if fidelity_n and src and src not in refs:
            try:
                ref = reference_logits(src, fidelity_n, progress=progress)
            except EdgemmError as e:
                refs[src] = None
                ref_notes[b] = f"reference {src} could not be loaded ({e})"
                continue
            f = tmpdir / f"ref{len(refs)}.npz"
            np.savez(f, n=len(ref), **{f"t{i}": np.array(r["tokens"], np.int64) for i, r in enumerate(ref)},
                     **{f"l{i}": r["logits"] for i, r in enumerate(ref)})
            refs[src] = str(f)
        mans[b]["_ref"] = src
    jobs = [(b, be, kv) for b in mans for be in backends for kv in kv_caches]
    results = []
    for b, be, kv in tqdm(jobs, desc="bench", unit="run", disable=not progress):
        man = mans[b]
        job = {"bundle": b, "backend": be, "device": device, "threads": threads, "repeats": repeats,
               "warmup": warmup, "decode_steps": decode_steps, "limit": limit, "progress": progress,
               "ref_file": refs.get(man.get("_ref")) if fidelity_n else None, "max_tiles": max_tiles,
               "kv_cache": kv, "inputs": inputs}
        got = _run_child(job) if isolate else _bench_one(job)
        first = got[0] if isinstance(got, list) else got
        wb = decode_weight_bytes(b, cpu=first.get("on_device") == "cpu")
        for res in got if isinstance(got, list) else [got]:       # one row per --max-tiles x input setting
            res["name"] = Path(b).name + (f" max-tiles {res.get('max_tiles') or 'all'}" if max_tiles else "") \
                + (f" {res['input']}" if res.get("input") else "") + (f" kv {kv}" if kv else "")
            res["target"] = man.get("target")
            res["precision"] = man.get("precision")
            res["recipe"] = bundle_recipe(man)
            res["size_mb"] = dir_size(b) / 1e6
            if b in ref_notes:
                res["fidelity_note"] = ref_notes[b]
            res["reference"] = man.get("_ref")
            if wb:
                res["weight_bytes_per_step"] = wb
                res["roofline_tok_s"] = bw / wb
                if "decode_tok_s" in res:
                    res["roofline_fraction"] = res["decode_tok_s"] / res["roofline_tok_s"]
                if res.get("kv_bytes_per_step") and "decode_tok_s" in res:     # weights + the KV cache read
                    res["roofline_kv_tok_s"] = bw / (wb + res["kv_bytes_per_step"])
                    res["roofline_kv_fraction"] = res["decode_tok_s"] / res["roofline_kv_tok_s"]
            results.append(res)
            if "error" in res:
                log(f"{res['name']} / {be}: {res['error']}")
    report = {"machine": machine, "bandwidth_gb_s": bw / 1e9, "settings": {
        "repeats": repeats, "warmup": warmup, "decode_steps": decode_steps, "limit": limit,
        "fidelity_prompts": fidelity_n, "threads": threads, "device": device, "max_tiles": max_tiles,
        "kv_caches": list(kv_caches), "inputs": [input_label(i) for i in inputs or ()]},
        "results": results}
    if out:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        from .bundle import write_json_atomic
        write_json_atomic(out / "bench.json", report, indent=1, default=_jsonable)
        write_csv(results, out / "bench.csv")
        try:
            plot(results, out / "bench.png")
        except ImportError:
            log("note: matplotlib is not installed, no plot (pip install 'edgemm[bench]')")
        report["files"] = [str(out / f) for f in ("bench.json", "bench.csv", "bench.png") if (out / f).exists()]
    return report


def bundle_recipe(man: dict) -> str:
    """What a bundle's weights got, from its manifest, one short string: the decoder stages' quantization recipe
    (onnx / trt: e.g. int4-gptq; "vision X" added when the vision stage differs), or the gguf decoder type with
    "+imatrix" when llama.cpp's quantizer had an importance matrix."""
    stages = man.get("stages") or {}
    def rec(st):
        q = (st or {}).get("quantization") or {}
        return (q.get("recipe") or {}).get("name") or (st or {}).get("precision") or "?"
    if man.get("target") == "gguf":
        d = stages.get("decoder") or {}
        return f"{d.get('precision', '?')}{'+imatrix' if d.get('imatrix') else ''}"
    dec = sorted({rec(v) for k, v in stages.items() if k.startswith("decoder")}) or ["?"]
    vis = rec(stages.get("vision")) if "vision" in stages else None
    out = "/".join(dec)
    return out if vis in (None, out) else f"{out} (vision {vis})"


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


COLUMNS = [("name", "bundle", "{}"), ("backend", "backend", "{}"), ("recipe", "recipe", "{}"),
           ("size_mb", "size MB", "{:.1f}"),
           ("peak_rss_mb", "peak RSS MB", "{:.0f}"), ("vision_inputs", "vision inputs", "{}"),
           ("image_rows", "image rows", "{}"),
           ("vision_ms", "vision ms", "{:.2f}"),
           ("ttft_ms", "TTFT ms", "{:.2f}"), ("decode_tok_s", "decode tok/s", "{:.1f}"),
           ("roofline_fraction", "of roofline", "{:.0%}"), ("roofline_kv_fraction", "+KV", "{:.0%}"),
           ("accuracy", "accuracy", "{:.3f}"),
           ("top1_agreement", "top-1 agree", "{:.3f}"), ("mean_kl", "mean KL", "{:.2e}")]


def format_table(report: dict) -> str:
    rows = [[h for _, h, _ in COLUMNS]]
    for r in report["results"]:
        if "error" in r:
            rows.append([r.get("name", "?"), r.get("backend_requested", "?"), r.get("recipe") or "-",
                         "error: " + r["error"][:60]] + [""] * (len(COLUMNS) - 4))
            continue
        rows.append([fmt.format(r[k]) if r.get(k) is not None else "-" for k, _, fmt in COLUMNS])
    w = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.rjust(w[i]) if i > 2 else c.ljust(w[i]) for i, c in enumerate(row)) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    m = report["machine"]
    if any(r.get("vision_inputs") is not None for r in report["results"]):
        lines.append("vision inputs: images, slices, tiles or frames the vision stage took; vision ms: from the "
                     "image (clip bytes) to its rows, preprocessing and clip decoding included")
    lines.append(f"machine: {m['cpu']} ({m['cores']} cores, {m['threads']} threads); bandwidth "
                 f"{report['bandwidth_gb_s']:.1f} GB/s; roofline = bandwidth / weight bytes per decode step "
                 "(+KV: weights + the KV cache a step reads at the decode's mean context)")
    return "\n".join(lines)


def write_csv(results: list, path) -> None:
    keys = ["name", "bundle", "target", "backend", "precision", "recipe", "size_mb", "peak_rss_mb", "image_rows", "image_size",
            "max_tiles", "input", "vision_inputs", "prompt_rows", "vision_ms", "ttft_ms",
            "decode_tok_s", "decode_ms_per_token", "weight_bytes_per_step", "roofline_tok_s", "roofline_fraction",
            "kv_bytes_per_step", "roofline_kv_fraction",
            "accuracy", "correct", "total", "top1_agreement", "mean_kl", "error"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, keys, extrasaction="ignore")
        w.writeheader()
        for r in results:
            w.writerow({k: (json.dumps(r[k]) if isinstance(r.get(k), dict) else r.get(k)) for k in keys})


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both lower latency and higher accuracy."""
    idx = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i):
            idx.append(i)
    return sorted(idx, key=lambda i: points[i][0])


def _accuracy(r: dict) -> float | None:
    a = r.get("accuracy")
    return a if isinstance(a, (int, float)) and a == a else None


LATENCIES = (("decode_ms_per_token", "decode latency (ms / token)"), ("ttft_ms", "time to first token (ms)"))
COSTS = LATENCIES + (("size_mb", "bundle size (MB)"),)     # the x axes against accuracy, each with its Pareto front


def figure(results: list):
    """The bench plot as a matplotlib Figure: latency against accuracy (Pareto front marked) for the bundles whose
    accuracy was measured; latency alone (a bar per bundle) when none was (`--limit 0`). Every bundle is named
    in a legend or on an axis, never by labels that may overlap."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in results if "error" not in r and r.get("decode_ms_per_token")]
    names = [f"{r['name']} ({r.get('backend', '?')}{', ' + r['recipe'] if r.get('recipe') else ''})" for r in ok]
    measured = [i for i, r in enumerate(ok) if _accuracy(r) is not None]
    costs = COSTS if measured and all(ok[i].get("size_mb") for i in measured) else LATENCIES
    fig, axes = plt.subplots(1, len(costs) if measured else 2, figsize=(5.7 * len(costs) if measured else 12,
                                                                        4.8 if measured else 1.6 + 0.45 * max(1, len(ok))))
    if not measured:                # accuracy skipped: nothing to put on a y axis but the bundles themselves
        for ax, (key, label) in zip(axes, LATENCIES):
            ax.barh(range(len(ok)), [r.get(key) or 0 for r in ok], color="steelblue")
            ax.set_yticks(range(len(ok)), names if ax is axes[0] else [""] * len(ok))
            ax.invert_yaxis()
            ax.set_xlabel(label)
            ax.grid(axis="x", alpha=0.3)
        fig.suptitle("edgemm bench: latency (accuracy not measured)")
        fig.tight_layout()
        return fig
    colors = plt.get_cmap("tab10" if len(measured) <= 10 else "tab20")
    for ax, (key, label) in zip(axes, costs):
        pts = [(ok[i][key], _accuracy(ok[i])) for i in measured]
        for n, (i, (x, y)) in enumerate(zip(measured, pts)):
            ax.scatter([x], [y], s=40, color=colors(n % colors.N), label=names[i])
        front = pareto(pts)
        ax.step([pts[i][0] for i in front], [pts[i][1] for i in front], where="post", color="crimson", lw=1.2,
                label="Pareto front")
        ax.scatter([pts[i][0] for i in front], [pts[i][1] for i in front], s=140, facecolors="none",
                   edgecolors="crimson")
        ax.set_xlabel(label)
        ax.set_ylabel("accuracy (shapes test split)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    skipped = [names[i] for i in range(len(ok)) if i not in measured]
    fig.suptitle(f"edgemm bench: latency{' and size' if costs is COSTS else ''} vs accuracy" + (f" (not plotted, accuracy not measured: {', '.join(skipped)})"
                                                        if skipped else ""), fontsize=10 if skipped else 12)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(labels) - 1) // 4), 1, 1))
    return fig


def plot(results: list, path) -> None:
    fig = figure(results)
    import matplotlib.pyplot as plt
    fig.savefig(path, dpi=110)
    plt.close(fig)
