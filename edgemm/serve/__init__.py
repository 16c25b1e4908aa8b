"""`edgemm serve`: an OpenAI-compatible HTTP server over the runtime (FastAPI + uvicorn, the `serve` extra).

    edgemm serve --bundle out/q4km --parallel 4          # http://127.0.0.1:8080/v1, model id "q4km"

Several --bundle options serve several variants; a request's `model` picks one (the bundle directory's name).
Binding anything but a loopback address needs an API key. See edgemm.serve.app (routes, limits) and
edgemm.serve.engine (slots).
"""
from __future__ import annotations

import ipaddress
from pathlib import Path

from ..chat_template import chat_template_of
from ..errors import EdgemmError

__all__ = ["is_loopback", "load_models", "serve"]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_models(models=(), bundles=(), backend="auto", device="auto", threads=None, parallel=1, max_queue=16,
                log=None, prefill_chunk=None, side_threads=None, **backend_options) -> dict:
    """-> {model id: edgemm.serve.app.Model}: each opened with `slots=parallel` and its own engine; backend_options
    (kv_cache, mmproj_offload: llama.cpp's) go to load_backend. side_threads: the engine's side worker, which
    encodes newcomers' images (and prefills their prompts where the backend allows) beside the decode loop
    (None: side_threads_default; 0: none, everything between the decode steps)."""
    from ..runtimes import load_backend
    from .app import Model
    from .engine import PREFILL_CHUNK, Engine
    side = side_threads_default(threads) if side_threads is None else int(side_threads)
    beside = side_has_own_cpus(threads, side)
    specs = [("model", m) for m in models] + [("bundle", b) for b in bundles]
    if not specs:
        specs = [("model", "tiny-shapes")]
    out = {}
    for kind, spec in specs:
        mid = Path(str(spec).rstrip("/")).name
        if mid in out:
            raise EdgemmError(f"two served models would both be called {mid!r}: give the bundle directories "
                              "distinct names")
        b = load_backend(backend, **{kind: spec}, device=device, threads=threads, log=log, slots=parallel,
                         vision_threads=side or None, **backend_options)
        out[mid] = Model(id=mid, backend=b, engine=Engine(b, parallel, max_queue, log=log,
                                                             prefill_chunk=PREFILL_CHUNK if prefill_chunk is None
                                                             else prefill_chunk, side_threads=side,
                                                             side_beside=beside),
                         template=chat_template_of(b))
        if log:
            log(f"serving {mid}: {b.describe()}, {parallel} slot(s)")
            why = b.unbatched_why() if parallel > 1 else None
            if why:
                log(f"note: {mid}: the {parallel} slots decode one after another, not in one batched step ({why}): "
                    "they answer concurrently, not faster in total")
    return out


def side_threads_default(threads=None) -> int:
    """The side worker's threads: the CPUs --threads leaves free, at least 1 (with --threads at every CPU the encode
    then shares one with decoding: the running streams' steps slow while it runs rather than stop)."""
    from ..cpu import default_threads, threads_or_default
    return max(1, default_threads()[0] - threads_or_default(threads))


def side_has_own_cpus(threads, side: int) -> bool:
    """Whether the side worker's threads and the decode threads together fit the CPUs: then its prefill pieces run
    at the same time as the decode steps, else in turns with them (edgemm.serve.engine's docstring)."""
    from ..cpu import default_threads, threads_or_default
    return side > 0 and threads_or_default(threads) + side <= default_threads()[0]


def serve(models=(), bundles=(), backend="auto", device="auto", threads=None, host="127.0.0.1", port=8080,
          parallel=1, max_queue=16, api_key=None, metrics=False, limits=None, log=print, grace=None,
          prefill_chunk=None, side_threads=None, **backend_options) -> None:
    """Run the server until SIGTERM or SIGINT, then drain for at most `grace` seconds (edgemm.serve.drain) and
    return (models load in the background; /health says 503 until ready)."""
    from .api import Limits
    from .app import create_app
    from .clients import capped_protocol
    from .drain import DEFAULT_GRACE, serve_draining
    if not is_loopback(host) and not api_key:
        raise EdgemmError(f"binding {host} exposes the server beyond this machine: give --api-key or "
                          "--api-key-file (or bind 127.0.0.1)")
    if parallel < 1 or max_queue < 0:
        raise EdgemmError("--parallel must be at least 1 and --max-queue at least 0")
    limits = limits or Limits()
    app = create_app({}, limits=limits, api_key=api_key, metrics=metrics,
                     loader=lambda: load_models(models, bundles, backend, device, threads, parallel, max_queue, log,
                                                prefill_chunk, side_threads, **backend_options))
    if log:
        log(f"edgemm serve on http://{host}:{port}/v1 ({'API key required' if api_key else 'no API key'}); "
            f"GET /health says when the models are loaded")
    serve_draining(app, DEFAULT_GRACE if grace is None else grace, log, host=host, port=port, log_level="warning",
                   timeout_keep_alive=5, access_log=False, http=capped_protocol(limits))
