"""The edgemm command line: a thin layer over the public Python functions."""
from __future__ import annotations

import functools
import json
import sys

import click

from .cpu import threads_or_default
from .errors import EdgemmError
from .llamacpp import KV_CHOICES


def _err(msg: str) -> None:
    click.echo(msg, err=True)


def handle_errors(fn):
    """User mistakes -> one line on stderr, exit code 2, no traceback."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except EdgemmError as e:
            _err(f"error: {e}")
            sys.exit(2)
        except OSError as e:            # an unwritable --json path, a full disk, a file that vanished
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            _err(f"error: {where}{e.strerror or e}")
            sys.exit(2)
        except KeyboardInterrupt:
            _err("interrupted")
            sys.exit(130)
    return wrapper


THREADS_HELP = ("CPU threads (default: the CPUs this process may use: its CPU affinity and cgroup CPU quota, else all "
                "cores; `edgemm doctor` prints the number).")


def model_options(fn):
    """--model/--bundle/--backend/--device/--threads, shared by every command that runs a model."""
    opts = [
        click.option("--model", default=None, help="Checkpoint directory or preset (tiny-shapes, bench-0.5b). "
                     "Default: tiny-shapes, the shipped trained demo model."),
        click.option("--bundle", default=None, type=click.Path(), help="An exported bundle directory."),
        click.option("--backend", default="auto", show_default=True,
                     type=click.Choice(["auto", "torch", "ort", "trt", "llamacpp"]),
                     help="auto: torch for model directories, the fastest supported backend for bundles."),
        click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cuda", "cpu"]),
                     help="auto uses a CUDA GPU when present and falls back to the CPU."),
        click.option("--threads", default=None, type=int, help=THREADS_HELP),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


KV_HELP = ("llamacpp backend: the KV cache type (default: f32 for an f32 decoder, else f16); q8_0 / q4_0 turn on "
           "flash attention, which llama.cpp's quantized V cache needs. ort backend: int8 (ONNX Runtime's "
           "GroupQueryAttention keeps the cache in int8, with scales fitted at export) or the bundle's float type. "
           "Other backends refuse it.")
MMPROJ_HELP = ("llamacpp backend on a GPU: keep the projector (mmproj) on the CPU, as llama-server's "
               "--no-mmproj-offload (frees GPU memory for layers and KV).")


def llama_options(fn):
    """--kv-cache / --no-mmproj-offload: llama.cpp's options, passed to the backend by load_backend."""
    fn = click.option("--no-mmproj-offload", "mmproj_offload", is_flag=True, flag_value=False, default=True,
                      help=MMPROJ_HELP)(fn)
    return click.option("--kv-cache", default=None, type=click.Choice(KV_CHOICES), help=KV_HELP)(fn)


def open_backend(model, bundle, backend, device, threads, quiet=False, max_tiles=None, kv_cache=None,
                 mmproj_offload=True):
    from .runtimes import load_backend
    if model and bundle:
        raise EdgemmError("give either --model or --bundle, not both")
    if threads is not None and threads < 1:
        raise EdgemmError("--threads must be at least 1")
    b = load_backend(backend, model=model, bundle=bundle, device=device, threads=threads_or_default(threads),
                     log=None if quiet else _err, kv_cache=kv_cache, mmproj_offload=mmproj_offload)
    if max_tiles is not None:               # any-resolution models: override the bundle's tile budget
        from .tilings import set_max_tiles
        set_max_tiles(b.cfg, max_tiles, getattr(b, "manifest", None))
    return b


MAX_TILES_HELP = ("Tiled models: the most grid tiles per image (fewer tiles, fewer image rows). LLaVA-NeXT: the "
                  "overview is always added; default: the bundle's (export --max-tiles), else every pinpoint. "
                  "InternVL: its max_patches (a thumbnail is added to several tiles); default: the bundle's, else "
                  "the checkpoint's.")


def _streamer():
    """Echo streamed text as it comes, without the answer's leading space."""
    started = False

    def emit(piece: str) -> None:
        nonlocal started
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        click.echo(piece, nl=False)
    return emit


def gen_options(fn):
    opts = [
        click.option("--max-new-tokens", default=32, show_default=True, type=int),
        click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy."),
        click.option("--top-k", default=0, show_default=True, type=int, help="0 = off."),
        click.option("--top-p", default=1.0, show_default=True, type=float, help="1 = off."),
        click.option("--seed", default=None, type=int, help="Sampling seed."),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _gen_config(max_new_tokens, temperature, top_k, top_p, seed, stop):
    from .generation import GenerationConfig
    return GenerationConfig(max_new_tokens, temperature, top_k, top_p, seed, tuple(stop))


VIDEO_HELP = ("Video clip (mp4/mov, webm/mkv) to ask about: frames sampled as the model's processor does "
              "(LLaVA-NeXT-Video, with --model on the torch backend); bounded in bytes, frames and pixels.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgemm")
def main():
    """edgemm: run, export, calibrate and measure multimodal LLMs with a routed visual expert decoder
    on edge machines (CUDA GPU when present, else the CPU).

    Without --model or --bundle every command uses the shipped demo model `tiny-shapes`.
    """


@main.command()
@click.argument("question")
@click.option("--image", type=click.Path(), default=None, help="Image to ask about (any size, most formats).")
@click.option("--video", type=click.Path(), default=None, help=VIDEO_HELP)
@click.option("--max-tiles", type=int, default=None, help=MAX_TILES_HELP)
@model_options
@llama_options
@gen_options
@handle_errors
def run(question, image, video, max_tiles, model, bundle, backend, device, threads, kv_cache, mmproj_offload,
        **gen):
    """Answer one QUESTION about an image, streaming the answer.

    Example: edgemm run --image examples/shapes.png "What color is the circle?"
    """
    from .generation import answer
    if not question.strip():
        raise EdgemmError("the question is empty: pass a question about the image")
    cfg = _gen_config(**gen)
    b = open_backend(model, bundle, backend, device, threads, max_tiles=max_tiles, kv_cache=kv_cache,
                     mmproj_offload=mmproj_offload)
    if video is not None:
        from .generation import ChatSession
        if image is not None:
            raise EdgemmError("pass --image or --video, not both")
        sess = ChatSession(b, cfg, log=_err)
        _set_video(sess, video)
        sess.ask(question, on_text=_streamer())
    else:
        answer(b, image, question, cfg, on_text=_streamer())
    click.echo()


def _set_video(sess, video) -> None:
    """A conversation about a clip (edgemm.video): its frames' rows where the model's template puts the video."""
    from .video import clip_rows, takes_video
    takes_video(sess.b.cfg)
    if sess.template is None:
        raise EdgemmError("this model has no chat template that places a video (<video>); import it with one")
    if sess.b.cfg.vision.video.get("question"):            # LLaMA-VID: the frames are encoded with the question
        from .video import load_clip
        sess.set_clip(load_clip(video, sess.b.cfg))
    else:
        sess.set_image_rows(*clip_rows(sess.b, video))


@main.command()
@click.option("--image", type=click.Path(), default=None, help="Image to start the chat with.")
@click.option("--video", type=click.Path(), default=None, help=VIDEO_HELP)
@click.option("--max-tiles", type=int, default=None, help=MAX_TILES_HELP)
@model_options
@llama_options
@gen_options
@handle_errors
def chat(image, video, max_tiles, model, bundle, backend, device, threads, kv_cache, mmproj_offload, **gen):
    """Interactive multi-turn chat; the KV cache is kept across turns.

    Commands: /image PATH, /video PATH (a new conversation about it), /reset, /quit.
    """
    from .generation import ChatSession
    if image and video:
        raise EdgemmError("pass --image or --video, not both")
    b = open_backend(model, bundle, backend, device, threads, max_tiles=max_tiles, kv_cache=kv_cache,
                     mmproj_offload=mmproj_offload)
    sess = ChatSession(b, _gen_config(**gen), log=_err)
    if image:
        sess.set_image(image)
    if video:
        _set_video(sess, video)
    _err(f"edgemm chat: {b.describe()}. /image PATH, /video PATH, /reset, /quit")
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        try:
            if line in ("/quit", "/exit"):
                break
            if line == "/reset":
                sess.reset()
                _err("(conversation reset)")
            elif line.split()[0] in ("/image", "/video"):
                cmd, _, path = line.partition(" ")
                if not path.strip():
                    raise EdgemmError(f"usage: {cmd} PATH")
                sess.set_image(path.strip()) if cmd == "/image" else _set_video(sess, path.strip())
                _err(f"({cmd[1:]} {path.strip()} loaded; new conversation)")
            elif line.startswith("/"):
                raise EdgemmError(f"unknown command {line.split()[0]}; commands: /image PATH, /video PATH, /reset, "
                                  "/quit")
            else:
                sess.ask(line, on_text=_streamer())
                click.echo()
        except EdgemmError as e:  # a bad turn does not end the chat
            _err(f"error: {e}")


@main.command("eval")
@model_options
@llama_options
@click.option("--data", type=click.Path(), default=None, help="JSONL of {image, question, answer[, type]} rows "
              "(image paths relative to the file). Default: the shapes test split (1,000 questions, fixed seed).")
@click.option("--limit", type=int, default=None, help="Only the first N questions.")
@click.option("--json", "json_path", type=click.Path(), default=None, help="Write the figures to this file.")
@handle_errors
def eval_cmd(model, bundle, backend, device, threads, kv_cache, mmproj_offload, data, limit, json_path):
    """Accuracy (exact match after lower-casing and stripping), per question type."""
    from .evaluate import evaluate, format_report
    b = open_backend(model, bundle, backend, device, threads, kv_cache=kv_cache, mmproj_offload=mmproj_offload)
    res = evaluate(b, data=data, limit=limit)
    click.echo(format_report(res))
    if json_path:
        from .bundle import write_json_atomic
        write_json_atomic(json_path, {k: v for k, v in res.items()} | {"backend": b.describe(), "source": b.source},
                          indent=1)


@main.command()
@click.option("--model", default=None, help="Checkpoint directory or preset (tiny-shapes, bench-0.5b, cogvlm-17b).")
@click.option("--bundle", default=None, type=click.Path(), help="An exported bundle directory.")
@click.option("--context", "contexts", multiple=True, type=int, help="Context lengths for the KV cache estimate.")
@click.option("--kv-cache", default=None, type=click.Choice(KV_CHOICES), help="Also the KV cache bytes at this "
              "llama.cpp type (gguf bundles), or at int8 (onnx bundles, the ort backend's); --kv-cache of run, chat, "
              "serve.")
@click.option("--parallel", default=None, type=int, help="Plan memory as `edgemm serve --parallel P` holds it: "
              "weights + vision + KV of P slots at each --context + working buffers, per the bundle's backend.")
@click.option("--memory", default=None, help="Also the most slots (and context) that fit this budget (6GiB, 6G, "
              "512MiB, 6e9), as `edgemm serve --memory` picks them.")
@handle_errors
def info(model, bundle, contexts, kv_cache, parallel, memory):
    """What a model or bundle is: config, parameters per branch, size, memory at each precision."""
    from .info import describe
    plan = []
    if parallel is not None or memory is not None:      # checked before the description is printed
        from .memory import describe_plan
        plan = describe_plan(model, bundle, contexts, parallel, memory, kv_cache)
    click.echo(describe(model=model, bundle=bundle, contexts=contexts or None, kv_cache=kv_cache))
    if plan:
        click.echo("\n".join(plan))


@main.command()
@click.option("--bundle", default=None, type=click.Path(), help="Also say which backend `auto` picks for this bundle.")
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cuda", "cpu"]))
@click.option("--json", "json_path", default=None, type=click.Path(), help="Write the facts to this file.")
@handle_errors
def doctor(bundle, device, json_path):
    """What this machine can run and why: CPU and the instruction sets its kernel enables, the llama.cpp CPU
    variant that loads, ONNX Runtime and its providers, CUDA / TensorRT / GPU, installed extras."""
    from .doctor import facts, report
    f = facts(bundle=bundle, device=device)
    click.echo(report(f))
    if json_path:
        from .bundle import write_json_atomic
        write_json_atomic(json_path, f)


def _prefill_chunk(value):
    """serve --prefill-chunk: auto -> None (the engine's maximum), else rows >= 0."""
    if value is None or str(value).strip().lower() == "auto":
        return None
    try:
        rows = int(value)
    except ValueError:
        rows = -1
    if rows < 0:
        raise click.BadParameter(f"{value!r}: give auto or a number of rows >= 0")
    return rows


@main.command()
@click.option("--model", "models", multiple=True, help="Checkpoint directory or preset to serve (repeatable; "
              "default tiny-shapes when no --bundle is given).")
@click.option("--bundle", "bundles", multiple=True, type=click.Path(), help="A bundle to serve (repeatable); its "
              "model id is the directory's name.")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", "torch", "ort", "trt", "llamacpp"]))
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cuda", "cpu"]))
@click.option("--threads", default=None, type=int, help=THREADS_HELP)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; anything but loopback "
              "needs --api-key.")
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--parallel", default=None, type=int, help="Conversations decoding at once per model (slots, each "
              "with its own KV cache; default 1, or with --memory the most that fit).")
@click.option("--context", default=None, type=int, help="Tokens per slot's KV cache (default the model's context, "
              "or with --memory the longest that fits).")
@click.option("--memory", default=None, help="Memory budget (6GiB, 6G, 512MiB, 6e9): weights + vision + KV cache + "
              "working buffers are planned to fit it (edgemm.memory); a configuration that cannot is refused.")
@click.option("--max-queue", default=16, show_default=True, type=int, help="Requests waiting beyond the slots; "
              "more get 503 with Retry-After.")
@click.option("--prefill-chunk", default="auto", show_default=True, callback=lambda c, p, v: _prefill_chunk(v),
              help="Most prompt rows a newcomer's prefill piece takes between two decode steps of the running "
              "streams. Within it each piece is sized by measured time: the server times its decode steps and "
              "prefill rows and gives a piece 0.5x the running streams' step (at least 4 rows; the maximum "
              "when none decodes). auto: at most 64 rows; N: at most N; 0: the whole prompt at once.")
@click.option("--stream-interval", default=0.0, show_default=True, type=click.FloatRange(min=0), help="Milliseconds: "
              "a streamed answer's text is sent at most this often, the tokens decoded meanwhile in one chunk (the "
              "first token at once; 0: a chunk per token, measured as fast as 20 ms with one client).")
@click.option("--side-threads", default=None, type=click.IntRange(min=0), help="Threads of the worker that encodes "
              "newcomers' images (and on torch and ort prefills their prompts) beside the decode loop (default: the "
              "CPUs --threads leaves free, at least 1; 0: all of it in the decode loop, between its steps). Where --threads "
              "+ --side-threads fit the CPUs its prefill pieces run while the streams decode, else in turns with their "
              "steps.")
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on every route but /health.")
@click.option("--api-key-file", default=None, type=click.Path(), help="Read the API key from this file.")
@click.option("--metrics", is_flag=True, help="Serve Prometheus metrics at GET /metrics.")
@click.option("--max-tokens", default=512, show_default=True, type=int, help="Hard cap on a request's max_tokens.")
@click.option("--max-image-pixels", default=16_000_000, show_default=True, type=int,
              help="Largest decoded image (width x height) a request may send.")
@click.option("--allow-remote-images", "remote_hosts", multiple=True, help="Allow http(s) image URLs from this "
              "host (repeatable); private, loopback and link-local addresses stay refused.")
@click.option("--body-timeout", default=30.0, show_default=True, type=float, help="Seconds a client has to send a "
              "request's head, then its body (slow clients get 408 and are closed; 0: no limit).")
@click.option("--max-client-connections", default=64, show_default=True, type=int, help="Open connections per "
              "client address (more get 429; plain serve, not --ray).")
@click.option("--grace-period", default=25.0, show_default=True, type=float, help="On SIGTERM or SIGINT: seconds "
              "the running requests have to finish (new ones get 503) before the server exits 0; a second signal "
              "stops at once. The default fits Kubernetes' 30 s before SIGKILL.")
@click.option("--ray", "use_ray", is_flag=True, help="Serve on Ray Serve (the local Ray, or the cluster in "
              "RAY_ADDRESS): replicas, autoscaling, backpressure.")
@click.option("--replicas", default=None, type=int, help="--ray: how many replicas (default 1).")
@click.option("--autoscale", default=None, help="--ray: MIN:MAX replicas, scaled by ongoing requests.")
@click.option("--ray-config", default=None, type=click.Path(), help="Write the Ray Serve config file for "
              "`serve deploy` on a cluster, and exit.")
@llama_options
@handle_errors
def serve(models, bundles, backend, device, threads, host, port, parallel, max_queue, prefill_chunk, stream_interval,
          side_threads, api_key, api_key_file, metrics, max_tokens, max_image_pixels, remote_hosts, body_timeout, max_client_connections,
          grace_period, use_ray, replicas, autoscale, ray_config, kv_cache, mmproj_offload, context, memory):
    """Serve models over HTTP with OpenAI-compatible routes (/v1/chat/completions, /v1/models, /health,
    /tokenize, /metrics).

    Example: edgemm serve --bundle out/q4km --parallel 4, then point an OpenAI client at
    http://127.0.0.1:8080/v1 with model "q4km".
    """
    from .serve.drain import exit_on_signal
    exit_on_signal()                        # SIGTERM before the server is up: exit 0 (then it drains)
    try:
        from .serve import serve as run_server
        from .serve.app import Limits
        import fastapi  # noqa: F401
    except ImportError as e:
        raise EdgemmError(f"edgemm serve needs the serve extra ({e}); pip install 'edgemm[serve]'") from None
    if models and bundles:
        raise EdgemmError("give --model or --bundle options, not both")
    if api_key_file:
        from pathlib import Path
        api_key = Path(api_key_file).read_text().strip()
        if not api_key:
            raise EdgemmError(f"--api-key-file {api_key_file} is empty")
    if body_timeout < 0 or max_client_connections < 1:
        raise EdgemmError("--body-timeout must be >= 0 and --max-client-connections >= 1")
    if not 0 <= grace_period < float("inf"):
        raise EdgemmError(f"--grace-period must be a number of seconds >= 0, not {grace_period}")
    limits = Limits(max_tokens=max_tokens, image_pixels=max_image_pixels, remote_hosts=tuple(remote_hosts),
                    body_seconds=body_timeout, client_connections=max_client_connections,
                    stream_interval=stream_interval / 1e3)
    if memory is not None or context is not None:
        from .memory import parse_size, served, serve_plan
        if use_ray or ray_config:
            raise EdgemmError("--memory and --context are not passed to Ray Serve replicas yet: serve without --ray")
        budget = parse_size(memory) if memory is not None else None
        plan = [] if budget is None else served(models, bundles, backend, device, kv_cache,
                                                 prefill_chunk=prefill_chunk, log=_err)
        context, parallel = serve_plan(budget, plan, context, parallel, log=_err)
    parallel = 1 if parallel is None else parallel
    if use_ray or ray_config:
        if kv_cache or not mmproj_offload:
            raise EdgemmError("--kv-cache and --no-mmproj-offload are not passed to Ray Serve replicas yet: serve "
                              "without --ray / --ray-config")
        from .serve import is_loopback
        from .serve import ray_app
        if (replicas is not None) and autoscale:
            raise EdgemmError("give --replicas or --autoscale, not both")
        if not ray_config and not is_loopback(host) and not api_key:
            raise EdgemmError(f"binding {host} exposes the server beyond this machine: give --api-key or "
                              "--api-key-file (or bind 127.0.0.1)")
        args = ray_app.ray_args(models, bundles, backend, device, threads, parallel, max_queue, api_key_file,
                                metrics, limits, replicas or 1, ray_app.parse_autoscale(autoscale), device == "cuda")
        if api_key and not api_key_file:
            args["api_key"] = api_key
        args["grace_period"] = grace_period
        if ray_config:
            ray_app.write_config(ray_config, args, host, port)
            _err(f"wrote {ray_config}: deploy it with `serve deploy {ray_config}` on a running Ray cluster")
            return
        try:
            import ray  # noqa: F401
        except ImportError as e:
            raise EdgemmError(f"--ray needs the ray extra ({e}); pip install 'edgemm[ray]'") from None
        ray_app.run(args, host, port, log=_err)
        return
    run_server(models, bundles, backend, device, threads, host, port, parallel, max_queue, api_key, metrics,
               limits, log=_err, grace=grace_period, prefill_chunk=prefill_chunk, side_threads=side_threads,
               kv_cache=kv_cache,
               mmproj_offload=mmproj_offload, **({"context": context} if context else {}))


@main.command("train-demo")
@click.option("-o", "--out", default="runs/tiny-shapes", show_default=True, type=click.Path())
@click.option("--steps", default=5000, show_default=True, type=int)
@click.option("--batch", default=48, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--threads", default=None, type=int, help=THREADS_HELP)
@handle_errors
def train_demo_cmd(out, steps, batch, seed, threads):
    """Train the demo model tiny-shapes from scratch (about 37 minutes on 2 CPU cores)."""
    from .train import train_demo
    res = train_demo(out, steps=steps, batch=batch, seed=seed, threads=threads_or_default(threads))
    click.echo(json.dumps(res["history"][-1]))


from .export import DEFAULT_PRECISION, TARGET_PRECISIONS  # noqa: E402  (a light registry module)


def parse_precision(target: str, spec: str | None) -> dict[str, str]:
    """'int8' or 'vision=fp16,decoder=int4' -> {'vision': ..., 'decoder': ...}."""
    spec = spec or DEFAULT_PRECISION[target]
    allowed = TARGET_PRECISIONS[target]
    out = {}
    if "=" in spec:
        for part in spec.split(","):
            stage, _, p = part.partition("=")
            stage, p = stage.strip(), p.strip()
            if stage not in ("vision", "decoder"):
                raise EdgemmError(f"--precision: unknown stage {stage!r}; stages are vision and decoder")
            out[stage] = p
        for stage in ("vision", "decoder"):
            out.setdefault(stage, DEFAULT_PRECISION[target])
    else:
        out = {"vision": spec, "decoder": spec}
    for stage, p in out.items():
        if p not in allowed:
            raise EdgemmError(f"--precision {p!r} is not available for --target {target}; choose one of "
                              f"{', '.join(allowed)}")
    return out


@main.command()
@click.option("--target", type=click.Choice(list(TARGET_PRECISIONS)), default="onnx", show_default=True)
@click.option("--model", default=None, help="Checkpoint directory or preset (default: tiny-shapes).")
@click.option("--precision", "--quant", "precision", default=None,
              help="onnx: fp32 fp16 int8 int8-wo int4 fp8 (default fp32); trt: fp16 int8 fp8 (default int8); "
                   "gguf: f32 f16 q8_0 q4_0 q4_k_m q5_k_m q6_k (default q8_0). Per stage: vision=fp16,decoder=int4.")
@click.option("-o", "--out", type=click.Path(), default=None, help="The bundle directory to write.")
@click.option("--force", is_flag=True, help="Replace an existing OUT.")
@click.option("--calib", default=None, help="Calibration set: a folder with images and prompts.jsonl "
              "(default: the bundled shapes calibration split).")
@click.option("--no-build", is_flag=True, help="trt: do not build engines here even if TensorRT and a GPU exist.")
@click.option("--threads", default=None, type=int, help=THREADS_HELP)
@click.option("--list-recipes", is_flag=True, help="List the quantization recipes and exit.")
@click.option("--keep-sensitive", type=float, default=None, help="Keep layers whose relative quantization error "
              "on the calibration inputs exceeds this (e.g. 0.05) at their original precision.")
@click.option("--recipe", default=None, help="onnx: quantization recipe instead of the precision's default, e.g. "
              "int8-sq (SmoothQuant); per stage: vision=int8,decoder=int8-sq. See --list-recipes.")
@click.option("--max-context", type=int, default=None, help="trt: the longest context the engines' optimisation "
              "profiles accept (default: the device class's, capped at the model's max_seq_len).")
@click.option("--profile", "device_class", type=click.Choice(["orin", "workstation"]), default=None,
              help="trt: the device class whose profiles engines built at export use (default: by the GPU here).")
@click.option("--max-tiles", type=int, default=None, help="onnx/trt, tiled (LLaVA-NeXT, InternVL) models: the "
              "bundle's default tile budget (most grid tiles per image; run/chat/bench can override it).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="onnx: the ONNX Runtime provider "
              "the bundle is for (default cpu). cuda, with --precision fp16: stages that compute in fp16 (activations, "
              "attention and KV cache); cpu: fp16 weights, fp32 compute (the CPU's faster form).")
@click.option("--moe-form", type=click.Choice(["ort-moe", "ort-qmoe4", "dense"]), default=None,
              help="onnx, mixture-of-experts models: how MoE layers are written: com.microsoft MoE (default), QMoE "
              "with int4 experts (the default with an int4 decoder), or dense standard ops (every expert computed).")
@click.option("--gguf-vision", type=click.Choice(["auto", "mmproj", "onnx"]), default=None,
              help="gguf: the vision stage as llama.cpp's mmproj (clip/mtmd) or as an ONNX graph run by ONNX Runtime "
              "beside llama.cpp's decoder (default auto: the mmproj where llama.cpp computes the tower and projector, "
              "else ONNX).")
@click.option("--imatrix/--no-imatrix", default=None, help="gguf: quantize the decoder with llama.cpp's importance "
              "matrix from the calibration set's text and image rows (default: for k-quants when --calib is given; "
              "--imatrix without --calib: the bundled set).")
@handle_errors
def export(target, model, precision, out, force, calib, no_build, threads, list_recipes, keep_sensitive, recipe,
           max_context, device_class, max_tiles, device, moe_form, gguf_vision, imatrix):
    """Export a model to a bundle, stage by stage, validated against the reference before it reports success."""
    from .export import EXPORTERS, export as run_export
    if list_recipes:
        try:
            from .calib.recipes import RECIPES
        except ImportError:
            RECIPES = {}
        for name, r in RECIPES.items():
            click.echo(f"{name:<10} {r}")
        if not RECIPES:
            click.echo("no quantization recipes are installed in this version")
        return
    if not out:
        raise EdgemmError("-o OUT is required: the bundle directory to write")
    prec = parse_precision(target, precision)
    extra = {}
    if keep_sensitive is not None:
        if target == "gguf":
            raise EdgemmError("--keep-sensitive applies to --target onnx and trt (Q/DQ and MatMulNBits layers); "
                              "gguf types are chosen per tensor by llama.cpp's quantizer")
        extra["keep_sensitive"] = keep_sensitive
    if recipe is not None:
        if target != "onnx":
            raise EdgemmError(f"--recipe applies to --target onnx; --target {target} takes its quantization from "
                              "--precision alone")
        extra["recipes"] = parse_recipes(recipe, prec)
    for flag, val, key in (("--max-context", max_context, "max_context"), ("--profile", device_class, "device_class")):
        if val is not None:
            if target != "trt":
                raise EdgemmError(f"{flag} applies to --target trt (TensorRT optimisation profiles); {target} "
                                  "bundles run any context up to the model's max_seq_len")
            extra[key] = val
    if max_context is not None and max_context < 1:
        raise EdgemmError("--max-context must be a positive number of tokens")
    if max_tiles is not None:
        if target not in ("onnx", "trt"):
            raise EdgemmError(f"--max-tiles applies to --target onnx and trt (the host tiles the image); a {target} "
                              "bundle tiles as its runtime does")
        extra["max_tiles"] = max_tiles
    if moe_form is not None:
        if target != "onnx":
            raise EdgemmError(f"--moe-form applies to --target onnx; {target} bundles write MoE layers one way "
                              f"({'dense standard ops' if target == 'trt' else 'llama.cpp expert tensors'})")
        extra["moe_form"] = moe_form
    if device is not None:
        if target != "onnx":
            raise EdgemmError(f"--device applies to --target onnx; {target} bundles are for "
                              f"{'TensorRT on a GPU' if target == 'trt' else 'llama.cpp'} by their target")
        extra["device"] = device
    if gguf_vision is not None:
        if target != "gguf":
            raise EdgemmError(f"--gguf-vision applies to --target gguf; {target} bundles' vision stage is an "
                              f"{'ONNX graph' if target == 'onnx' else 'engine'} by their target")
        extra["vision"] = gguf_vision
    if imatrix is not None:
        if target != "gguf":
            raise EdgemmError(f"--imatrix applies to --target gguf (llama.cpp's quantizer); {target} bundles take "
                              "their calibration from --calib and --recipe")
        extra["imatrix"] = imatrix
    if target not in EXPORTERS:
        raise EdgemmError(f"the {target} exporter is not available in this version of edgemm")
    import torch
    torch.set_num_threads(threads_or_default(threads))
    run_export(target, model=model, out=out, precision=prec, force=force, calib=calib, no_build=no_build,
               log=_err, threads=threads, **extra)


def parse_recipes(spec: str, prec: dict) -> dict:
    """--recipe NAME | vision=NAME,decoder=NAME -> {stage group: recipe}; each must fit its stage's precision."""
    from .calib.recipes import RECIPES, get_recipe
    pairs = [p.split("=", 1) for p in spec.split(",")] if "=" in spec else [[g, spec] for g in ("vision", "decoder")]
    out = {}
    for pair in pairs:
        if len(pair) != 2 or pair[0].strip() not in ("vision", "decoder"):
            raise EdgemmError(f"--recipe {spec!r}: write NAME or vision=NAME,decoder=NAME")
        group, name = pair[0].strip(), pair[1].strip()
        from .calib.recipes import QUANTIZED
        r = get_recipe(name)
        if prec[group] not in QUANTIZED:
            if "=" in spec:
                raise EdgemmError(f"--recipe {group}={name}: the {group} stage is exported at {prec[group]}, "
                                  "which is not quantized; give --precision a quantized value for it")
            continue
        base = RECIPES[prec[group]]

        def fits(x):
            return x.weights == base.weights and (x.activations is None) == (base.activations is None)
        if not fits(r):
            raise EdgemmError(f"--recipe {name} does not compute --precision {prec[group]} ({group}); recipes "
                              f"for it: {', '.join(n for n, x in RECIPES.items() if fits(x))}")
        out[group] = name
    if not out:
        raise EdgemmError("--recipe needs a quantized --precision (int8, int8-wo, int4 or fp8)")
    return out


from .families import names as family_names  # noqa: E402  (light: no torch)


@main.command("families")
@click.option("--json", "as_json", is_flag=True, help="Print the families and the support matrix as JSON.")
@handle_errors
def families_cmd(as_json):
    """The model families edgemm imports, the blocks each composes and the targets that export it, then the
    support matrix (feature x target) those targets are derived from."""
    from .families import describe
    click.echo(describe(as_json))


@main.command("import")
@click.argument("src", type=click.Path())
@click.option("-o", "--out", required=True, type=click.Path(), help="The edgemm checkpoint directory to write.")
@click.option("--from", "family", default="auto", show_default=True,
              type=click.Choice(["auto", *family_names()]),
              help="The source family; auto reads it from config.json.")
@click.option("--tokenizer", default=None, type=click.Path(),
              help="A directory with tokenizer.json, for checkpoints that ship none (cogvlm-chat-hf).")
@click.option("--rules", default="original", show_default=True, type=click.Choice(["original", "llamacpp"]),
              help="cogvlm: CogVLM's own position/routing rules, or llama.cpp's (sequential positions, eoi "
                   "through the vision branch; exports to GGUF).")
@click.option("--shard-size", default="2GB", show_default=True, help="Largest output weight file.")
@click.option("--allow-bin", is_flag=True, help="Read pickled pytorch_model*.bin weights (torch.load with "
              "weights_only=True). Off by default: unpickling can run code; prefer safetensors.")
@click.option("--force", is_flag=True, help="Replace an existing OUT.")
@handle_errors
def import_cmd(src, out, family, tokenizer, rules, shard_size, allow_bin, force):
    """Import a Hugging Face-layout checkpoint (CogVLM, Libra, LLaVA incl. MoE language models, LLaVA-NeXT,
    BLIP-2, InstructBLIP, Idefics), streaming shard by shard."""
    from .importers import import_checkpoint, parse_size
    import_checkpoint(src, out, family=family, tokenizer=tokenizer, force=force, rules=rules,
                      shard_bytes=parse_size(shard_size), log=_err, allow_bin=allow_bin)


@main.command("build-engines")
@click.argument("bundle", type=click.Path())
@click.option("--profile", "device_class", type=click.Choice(["orin", "workstation"]), default=None,
              help="Optimization profiles to build (default: orin on a Jetson, else workstation).")
@click.option("--force", is_flag=True, help="Rebuild engines that already exist for this GPU.")
@click.option("--threads", default=None, type=int, help=THREADS_HELP)
@handle_errors
def build_engines_cmd(bundle, device_class, force, threads):
    """Build the TensorRT engines of a trt BUNDLE on this machine (engines are tied to the GPU and the
    TensorRT version), validate them against the bundle's Q/DQ graphs, and add them to its manifest."""
    from .export.trt_engines import build_engines
    build_engines(bundle, device_class=device_class, force=force, log=_err, threads=threads)


@main.command()
@click.option("--model", default=None, help="Checkpoint directory or preset (default: tiny-shapes).")
@click.option("--calib", default=None, type=click.Path(), help="A folder with images and prompts.jsonl "
              "(default: the bundled shapes calibration split).")
@click.option("-n", "--samples", default=None, type=int, help="Use only the first N samples (bundled: default 64).")
@click.option("--method", default="percentile", show_default=True, type=click.Choice(["max", "percentile", "entropy"]),
              help="Threshold shown in the summary (every method is computable from the saved statistics).")
@click.option("--cache", default=None, type=click.Path(), help="Statistics cache folder (default ~/.cache/edgemm/calib).")
@click.option("--refresh", is_flag=True, help="Recompute even if cached statistics exist.")
@click.option("--json", "json_path", default=None, type=click.Path(), help="Write the per-layer summary here.")
@click.option("--threads", default=None, type=int, help=THREADS_HELP)
@click.option("--outliers", is_flag=True, help="Print instead, per decoder linear input, the largest per-channel "
              "|x| over the median one for text rows and for image rows (edgemm.outliers).")
@handle_errors
def calibrate(model, calib, samples, method, cache, refresh, json_path, threads, outliers):
    """Record activation statistics per stage, layer and modality branch over a calibration set (cached by the
    digests of the set and the model; every quantizing exporter reuses them)."""
    import torch
    from .calib.stats import collect_stats
    torch.set_num_threads(threads_or_default(threads))
    st = collect_stats(model, calib, n=samples, cache=cache, refresh=refresh, log=_err)
    if outliers:
        from .outliers import format_outliers
        return click.echo(format_outliers(st))
    rows = st.summary()
    click.echo(f"{'layer':<52} {'branch':<12} {'rows':>6} {'max':>9} {method:>10}")
    for r in rows:
        v = st.layers[r["key"]].amax(method)
        click.echo(f"{r['key']:<52} {r['branch']:<12} {r['rows']:>6} {r['max']:>9.3g} {v:>10.3g}")
    click.echo(f"statistics: {st.path or '(not cached)'} ({st.meta.get('samples')} samples of {st.meta.get('set')})")
    if json_path:
        from .bundle import write_json_atomic
        write_json_atomic(json_path, {"meta": st.meta, "layers": rows, "file": str(st.path)}, indent=1)


@main.command()
@click.argument("bundles", nargs=-1, type=click.Path())
@click.option("--backend", "backends", multiple=True, default=("auto",), show_default=True,
              type=click.Choice(["auto", "ort", "trt", "llamacpp"]), help="Repeatable: each bundle on each backend.")
@click.option("--reference", default=None, help="The fp32 reference model for fidelity (default: each manifest's "
              "source model).")
@click.option("--limit", default=None, type=int, help="Questions of the test split for accuracy (default all "
              "1,000; 0 skips accuracy).")
@click.option("--fidelity-prompts", default=32, show_default=True, type=int, help="0 skips fidelity.")
@click.option("--repeats", default=5, show_default=True, type=int)
@click.option("--warmup", default=2, show_default=True, type=int)
@click.option("--decode-steps", default=32, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cuda", "cpu"]))
@click.option("--threads", default=None, type=int, help=THREADS_HELP)
@click.option("-o", "--out", default="bench-out", show_default=True, type=click.Path(),
              help="Folder for bench.json, bench.csv and bench.png.")
@click.option("--max-tiles", default=None, help="Any-resolution (LLaVA-NeXT) bundles: tile budgets to compare, "
              "comma-separated, 'default' = the bundle's own (e.g. 1,default): one row each, timed in interleaved "
              "rounds.")
@click.option("--kv-cache", "kv_caches", multiple=True, type=click.Choice(KV_CHOICES), help="llamacpp / ort "
              "backends: KV cache types to compare (repeatable: one row each, accuracy included; default: the "
              "backend's; ort: f32 and int8).")
@click.option("--images", default=None, help="Image sizes WxH, comma-separated (e.g. 336x336,672x336,1008x336): "
              "the test image resized to each, a row each with the vision inputs (slices, tiles) it made, vision ms, "
              "TTFT and decode tok/s.")
@click.option("--frames", default=None, help="Video models: frame counts, comma-separated (e.g. 1,4,8,16): a "
              "generated clip the model's own sampling takes that many frames of, a row each.")
@handle_errors
def bench(bundles, backends, reference, limit, fidelity_prompts, repeats, warmup, decode_steps, device, threads, out,
          max_tiles, kv_caches, images, frames):
    """Latency, memory, size, accuracy and fidelity of each BUNDLE on each backend: a table, JSON, CSV and a
    latency-vs-accuracy plot with the Pareto front (latency alone when --limit 0 skips accuracy)."""
    from .bench import bench as run_bench, format_table
    if not bundles:
        raise EdgemmError("give one or more bundle directories: edgemm bench out/fp32 out/int8 ...")
    tiles = None
    if max_tiles is not None:
        try:
            tiles = [None if t.strip() == "default" else int(t) for t in max_tiles.split(",")]
        except ValueError:
            raise EdgemmError(f"--max-tiles {max_tiles!r}: give numbers or 'default', comma-separated") from None
    from .bench import parse_inputs
    rep = run_bench(list(bundles), backends=backends, reference=reference, limit=limit, repeats=repeats,
                    warmup=warmup, decode_steps=decode_steps, threads=threads, device=device, out=out,
                    fidelity_n=fidelity_prompts, log=_err, max_tiles=tiles, kv_caches=kv_caches or (None,),
                    inputs=parse_inputs(images, frames))
    click.echo(format_table(rep))
    for f in rep.get("files", []):
        _err(f"wrote {f}")
