"""Stopping `edgemm serve` without dropping a request: SIGTERM (systemd, Kubernetes, Ray's tooling) or SIGINT drains.

On the first signal the server takes no new work: every new request, /health included (a load balancer then takes
the server out), is answered 503 in OpenAI's error shape (code "draining", `Retry-After`, `Connection: close`);
the requests already running, streams and queued ones included, go on to their end, for at most the grace period
(`--grace-period`); then the server closes and the process exits 0. A second signal ends the grace period at once.
Requests still running at its end are cut (their connections close) and the process still exits 0.

- DrainGate (an ASGI middleware, outermost in every app of create_app) counts the requests in the app
  (`state.inflight`) and refuses new ones while `state.draining`.
- serve_draining: plain `edgemm serve`; uvicorn's Server with its signal handling replaced (uvicorn's own closes
  at once and then re-raises the signal, so the process died by it: exit status -15).
- `--ray`: the signal reaches the driver process (`edgemm serve --ray`), not the replicas. The driver owns a small
  named actor, DrainBoard; each replica (follow_board) reports its running requests to it every 0.2 s and learns
  from it when to drain. On a signal the driver sets the board to draining, waits until every replica reports
  none running (or the grace period ends), then shuts its Serve application and Ray down and returns (exit 0),
  instead of Ray's native handler aborting the process with a stack dump. An app deployed with `serve deploy`
  has no board: Ray's own graceful shutdown (`graceful_shutdown_timeout_s` = the grace period) applies.
"""
from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time

from .api import APIError, error_response

DEFAULT_GRACE = 25.0        # seconds; Kubernetes sends SIGKILL 30 s after SIGTERM by default
SIGNALS = (signal.SIGTERM, signal.SIGINT)
BOARD, BOARD_NAMESPACE = "edgemm-drain", "edgemm"
REPORT_EVERY = 0.2          # seconds between a replica's reports to the board
STALE_AFTER = 5.0           # a replica silent this long is gone (killed, scaled down): not waited for
SETTLE = 1.0                # seconds between the replicas' last request ending and Serve's shutdown (below)


def exit_on_signal() -> None:
    """Until the server is up there is nothing to drain: SIGTERM/SIGINT exit 0 at once (instead of dying by the
    signal). serve_draining and catch_signals take the signals over once it is."""
    def leave(sig, frame):
        # not SystemExit: raised where the handler happens to run (inside an import lock's callback, say) it can
        # be swallowed ("Exception ignored in ..."), and the server then started and never stopped
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()
            except Exception:
                pass
        os._exit(0)
    for sig in SIGNALS:
        signal.signal(sig, leave)


class DrainGate:
    """ASGI middleware: counts the HTTP requests inside the app in `state.inflight` (until their last byte is
    sent); while `state.draining` new ones get 503 in OpenAI's shape and their connection closes."""

    def __init__(self, app, state):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st = self.state
        if st.draining:
            refused = APIError(503, "the server is shutting down; retry on another replica or after it restarts",
                               "server_error", "draining", headers={"Retry-After": "5", "Connection": "close"})
            return await error_response(st, refused)(scope, receive, send)
        st.inflight += 1                       # the event loop's thread only: no lock
        try:
            await self.app(scope, receive, send)
        finally:
            st.inflight -= 1


def install_drain(app) -> None:
    """The gate, outermost: call it after every other add_middleware of the app."""
    app.state.draining, app.state.inflight = False, 0
    app.add_middleware(DrainGate, state=app.state)


class Drain:
    """The drain's clock: the first signal starts it (`deadline` = now + grace), a second ends it now."""

    def __init__(self, grace: float, log=None, on_start=None):
        self.grace, self.log, self.on_start = float(grace), log, on_start
        self.deadline: float | None = None
        self.started = threading.Event()

    def signal(self, sig, frame=None) -> None:
        now = time.monotonic()
        if self.deadline is not None:
            self.deadline = now
            self.say(f"{_name(sig)} again: stopping now")
            return
        self.deadline = now + self.grace
        if self.on_start is not None:
            self.on_start()
        self.say(f"{_name(sig)}: draining (new requests get 503; running ones have up to {self.grace:g} s)")
        self.started.set()

    def say(self, msg: str) -> None:
        if self.log:
            try:
                self.log(msg)
            except RuntimeError:        # the signal came in the middle of a write to the same stream
                pass

    def over(self, busy: int) -> bool:
        """Whether to stop now: nothing running, or the grace period is over."""
        return self.deadline is not None and (busy == 0 or time.monotonic() >= self.deadline)


def _name(sig) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def close_engines(state) -> None:
    for m in list(getattr(state, "models", {}).values()):
        m.engine.close()


def serve_draining(app, grace: float = DEFAULT_GRACE, log=None, **uvicorn_config) -> None:
    """uvicorn.run(app, **uvicorn_config), draining on SIGTERM/SIGINT; returns when stopped (the process then
    exits 0)."""
    import uvicorn
    state = app.state

    def start():
        state.draining = True
    drain = Drain(grace, log, on_start=start)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):         # uvicorn's: stop now, then re-raise the signal at exit
            drain.signal(sig, frame)

        async def on_tick(self, counter) -> bool:
            if drain.over(state.inflight):
                if not self.should_exit and state.inflight:
                    drain.say(f"grace period over: cutting {state.inflight} running request(s)")
                self.should_exit = True
            return await super().on_tick(counter)

        async def shutdown(self, sockets=None):
            await super().shutdown(sockets)
            # the engines' workers stop while the loop still runs: a decode step that the interpreter's exit cut
            # in native code would abort the process ("terminate called without an active exception")
            await asyncio.to_thread(close_engines, state)

    # past the grace period uvicorn cancels what still runs (after 0.2 s: the last bytes of finished answers)
    DrainingServer(uvicorn.Config(app, timeout_graceful_shutdown=0.2, **uvicorn_config)).run()
    if log and drain.deadline is not None:
        log("stopped")


# ------------------------------------------------------------------------------------------------ Ray Serve
def board_class():
    """The DrainBoard actor class (defined on first use: `import ray` only here)."""
    import ray

    @ray.remote(num_cpus=0)
    class DrainBoard:
        """What the driver and the replicas share: whether to drain, each replica's running requests."""

        def __init__(self):
            self.draining, self.replicas = False, {}

        def report(self, replica: str, inflight: int, draining: bool) -> bool:
            self.replicas[replica] = (time.monotonic(), int(inflight), bool(draining))
            return self.draining

        def start(self) -> None:
            self.draining = True

        def busy(self) -> int:
            """Requests still running over the live replicas (one that has not yet seen the drain counts 1)."""
            now = time.monotonic()
            return sum(n if seen else max(n, 1) for t, n, seen in self.replicas.values()
                       if now - t < STALE_AFTER)
    return DrainBoard


def create_board():
    """The driver's board (owned by the driver: it goes when the driver does)."""
    return board_class().options(name=BOARD, namespace=BOARD_NAMESPACE, get_if_exists=True).remote()


def follow_board(state, replica: str) -> bool:
    """In a replica: report `state.inflight` to the driver's board and drain when it says so (False: no board,
    e.g. an app deployed with `serve deploy`)."""
    import ray
    try:
        board = ray.get_actor(BOARD, namespace=BOARD_NAMESPACE)
    except ValueError:
        return False

    def loop():
        while True:
            try:
                if ray.get(board.report.remote(replica, state.inflight, state.draining), timeout=30):
                    state.draining = True
            except Exception:                   # the driver and its board are gone: nothing more to follow
                return
            time.sleep(REPORT_EVERY)
    threading.Thread(target=loop, name="edgemm-drain", daemon=True).start()
    return True


def catch_signals(grace: float = DEFAULT_GRACE, log=None) -> Drain:
    """In the driver, right after ray.init: SIGTERM/SIGINT start a Drain instead of Ray's native handler (which
    dumps a stack and aborts the driver); one that comes while Serve starts is acted on once it has started."""
    drain = Drain(grace, log)
    for sig in SIGNALS:
        signal.signal(sig, drain.signal)
    return drain


def wait_ray_drained(board, drain: Drain) -> None:
    """In the driver: block until the signal, then drain every replica through `board` (until `drain`'s grace
    period ends; a second signal stops at once). The caller then shuts Serve down."""
    import ray
    while not drain.started.wait(0.5):
        pass
    ray.get(board.start.remote(), timeout=30)   # a replica counts busy until it reports having seen this
    while not drain.over(ray.get(board.busy.remote(), timeout=30)):
        time.sleep(REPORT_EVERY)
    left = ray.get(board.busy.remote(), timeout=30)
    if left:
        drain.say(f"grace period over: cutting {left} running request(s)")
    else:
        # requests that waited in Ray's queue (all slots busy) reach a replica as the last ones end, and are
        # answered 503 there: a moment for that before Serve's shutdown drops whatever its proxy still holds
        time.sleep(max(0.0, min(SETTLE, drain.deadline - time.monotonic())))
