"""`edgemm serve --ray`: the same FastAPI app of edgemm.serve, mounted in Ray Serve (`@serve.ingress`).

Each replica is a Ray actor holding the loaded backends of every served bundle, with its own slots (engine);
Ray's proxy spreads requests over the replicas (`--replicas N` or `--autoscale MIN:MAX`), at most
`max_ongoing_requests` (= the slots) at a time per replica, with a bounded queue in front (`max_queued_requests`);
beyond it Ray answers 503, like the single-box server's own queue. Nothing about serving is written twice: the
routes, limits and errors are edgemm.serve.app's.

Several bundles behind one endpoint: every replica holds all of them and the app picks one by the request's
`model`, as on one box. (Ray's model multiplexing routes by a request header, and OpenAI clients put the model
in the JSON body; a router deployment in front would add a hop per request. For edge-sized bundles, such as the
int8 and int4 variants of one model, one replica holding each is the bounded, simple choice; its memory is the
sum of the bundles, which `edgemm info --bundle` estimates.)

Responses carry `x-edgemm-replica`, the Ray replica that answered. SIGTERM or SIGINT to the driver drains the
replicas, then shuts Serve and Ray down (edgemm.serve.drain).
"""
from __future__ import annotations

import os

APP_NAME = "edgemm"
DEPLOYMENT = "EdgemmReplica"


def _settings(args: dict) -> dict:
    keys = ("models", "bundles", "backend", "device", "threads", "parallel", "max_queue", "api_key", "metrics",
            "limits")
    out = {k: args.get(k) for k in keys}
    out["models"], out["bundles"] = list(out["models"] or ()), list(out["bundles"] or ())
    out["parallel"] = int(out["parallel"] or 1)
    out["max_queue"] = int(out["max_queue"] if out["max_queue"] is not None else 16)
    if args.get("api_key_file") and not out["api_key"]:
        out["api_key"] = open(args["api_key_file"]).read().strip()
    return out


def build_app(args: dict):
    """Ray Serve application builder (also the `import_path` of the config `--ray-config` writes)."""
    from ray import serve
    from .app import Limits, create_app
    from .drain import follow_board
    s = _settings(args)
    limits = Limits(**s["limits"]) if isinstance(s["limits"], dict) else (s["limits"] or Limits())

    def build_asgi():
        """Runs on each replica as it starts: load the backends, then the one app over them."""
        from . import load_models
        models = load_models(s["models"], s["bundles"], s["backend"] or "auto", s["device"] or "auto", s["threads"],
                             s["parallel"], s["max_queue"], log=print)
        app = create_app(models, limits=limits, api_key=s["api_key"], metrics=bool(s["metrics"]))
        ctx = serve.get_replica_context()
        rid = getattr(ctx, "replica_id", None)
        app.state.replica = getattr(rid, "unique_id", None) or getattr(ctx, "replica_tag", None) or str(rid)
        follow_board(app.state, str(app.state.replica))       # drain when the driver says (edgemm.serve.drain)
        return app

    opts = {"name": DEPLOYMENT, "max_ongoing_requests": s["parallel"],
            "max_queued_requests": max(1, s["max_queue"]),
            "ray_actor_options": {"num_cpus": float(args.get("num_cpus") or 1),
                                  "num_gpus": float(args.get("num_gpus") or 0)},
            "health_check_period_s": 5, "graceful_shutdown_timeout_s": _grace(args)}
    auto = args.get("autoscale")
    if auto:
        lo, hi = auto
        opts["autoscaling_config"] = {"min_replicas": int(lo), "max_replicas": int(hi), "initial_replicas": int(lo),
                                      "target_ongoing_requests": max(1, s["parallel"] // 2 or 1)}
    else:
        opts["num_replicas"] = int(args.get("replicas") or 1)
    return serve.deployment(**opts)(serve.ingress(build_asgi)()).bind()


def _grace(args: dict) -> float:
    """Ray's own wait for a stopping replica's requests (serve shutdown, serve deploy, scaling down): the grace
    period."""
    from .drain import DEFAULT_GRACE
    g = args.get("grace_period")
    return float(DEFAULT_GRACE if g is None else g)


def parse_autoscale(spec: str | None):
    from ..errors import EdgemmError
    if spec is None:
        return None
    try:
        lo, hi = (int(x) for x in spec.split(":"))
    except ValueError:
        raise EdgemmError(f"--autoscale {spec!r}: write MIN:MAX, e.g. 1:4") from None
    if not 0 <= lo <= hi or hi < 1:
        raise EdgemmError(f"--autoscale {spec!r}: need 0 <= MIN <= MAX and MAX >= 1")
    return lo, hi


def ray_args(models, bundles, backend, device, threads, parallel, max_queue, api_key_file, metrics, limits,
             replicas, autoscale, gpu: bool) -> dict:
    """The builder's args (kept JSON/YAML-friendly for the config file)."""
    import dataclasses
    return {"models": [os.path.abspath(m) if os.path.isdir(m) else m for m in models],
            "bundles": [os.path.abspath(b) for b in bundles], "backend": backend, "device": device,
            "threads": threads, "parallel": parallel, "max_queue": max_queue, "metrics": metrics,
            "api_key_file": os.path.abspath(api_key_file) if api_key_file else None,
            "limits": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(limits).items()},
            "replicas": replicas, "autoscale": list(autoscale) if autoscale else None,
            "num_cpus": threads or 1, "num_gpus": 1 if gpu else 0}


def write_config(path, args: dict, host: str, port: int) -> None:
    """The Serve config file `serve deploy` takes on a running cluster."""
    import yaml
    dep = {"name": DEPLOYMENT, "max_ongoing_requests": args["parallel"],
           "max_queued_requests": max(1, args["max_queue"]),
           "ray_actor_options": {"num_cpus": float(args["num_cpus"]), "num_gpus": float(args["num_gpus"])},
           "graceful_shutdown_timeout_s": _grace(args)}
    if args.get("autoscale"):
        lo, hi = args["autoscale"]
        dep["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": lo}
    else:
        dep["num_replicas"] = int(args.get("replicas") or 1)
    cfg = {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port},
           "applications": [{"name": APP_NAME, "route_prefix": "/", "import_path": "edgemm.serve.ray_app:build_app",
                             "args": args, "deployments": [dep]}]}
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)


def run(args: dict, host: str, port: int, log=print, block: bool = True):
    """Start the app on the local Ray (or the cluster `ray start --head` made: RAY_ADDRESS / auto); with
    `block`, serve until SIGTERM or SIGINT, drain (edgemm.serve.drain), shut Serve and Ray down and return."""
    import ray
    from ray import serve
    from .drain import catch_signals, create_board, wait_ray_drained
    cluster = os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        ray.init(address=cluster, include_dashboard=False, log_to_driver=False, configure_logging=False)
    drain = catch_signals(_grace(args), log) if block else None
    board = create_board()                                   # before the replicas start: they look it up
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(args), name=APP_NAME, route_prefix="/")
    if log:
        log(f"edgemm on Ray Serve at http://{host}:{port}/v1 ({args.get('replicas') or args.get('autoscale')} "
            "replica(s)); SIGTERM or Ctrl-C drains and stops it")
    if block:
        wait_ray_drained(board, drain)
        if cluster:                                          # a shared cluster: only this application goes
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
        if log:
            log("stopped")
