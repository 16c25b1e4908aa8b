"""SIGTERM and SIGINT drain `edgemm serve` and `edgemm serve --ray` (edgemm.serve.drain): the running requests
finish, new ones get 503 in OpenAI's shape, the process exits 0 within the grace period; `--ray` also shuts its
Serve application and Ray down. Each server is a real `edgemm serve` process on a free loopback port."""
from __future__ import annotations

import http.client
import importlib.util
import json
import os
import signal
import socket
import threading
import time

import pytest

from tests.conftest import requires_demo
from tests.test_serve import Server, _free_port

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("fastapi") is None
                                 or importlib.util.find_spec("openai") is None,
                                 reason="needs the serve and test extras (fastapi, uvicorn, openai)"), requires_demo]


class Stream:
    """One streamed chat request (ignore_eos: exactly max_tokens tokens) in a thread; what came back."""

    def __init__(self, port: int, max_tokens: int):
        self.port, self.max_tokens, self.started = port, max_tokens, threading.Event()
        self.status = self.usage = self.finish = self.error = self.t_end = None
        self.done = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        body = {"messages": [{"role": "user", "content": "Describe the picture."}], "max_tokens": self.max_tokens,
                "ignore_eos": True, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            c.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
            r = c.getresponse()
            self.status = r.status
            for raw in r:
                self.started.set()
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    self.done = True
                elif line.startswith("data: "):
                    d = json.loads(line[6:])
                    self.usage = d.get("usage") or self.usage
                    for ch in d.get("choices") or ():
                        self.finish = ch.get("finish_reason") or self.finish
        except (OSError, http.client.HTTPException) as e:          # cut: the connection closed mid-answer
            self.error = repr(e)
        finally:
            self.t_end = time.monotonic()
            c.close()

    def complete(self) -> bool:
        return (self.status == 200 and self.done and self.finish == "length"
                and (self.usage or {}).get("completion_tokens") == self.max_tokens)


def _request(port: int, method: str, path: str, body=None) -> tuple[int, dict, dict]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        c.request(method, path, json.dumps(body) if body is not None else None, {"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"{}"), {k.lower(): v for k, v in r.getheaders()}
    finally:
        c.close()


def _draining_refusal(port: int, method: str, path: str, body=None) -> None:
    status, data, headers = _request(port, method, path, body)
    assert status == 503, (status, data)
    assert data["error"]["code"] == "draining" and data["error"]["type"] == "server_error", data
    assert set(data["error"]) >= {"message", "type", "param", "code"} and headers.get("retry-after"), (data, headers)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def _streams(port: int, n: int, max_tokens: int) -> list[Stream]:
    """n streams, each answering (its first chunk in: accepted, running or queued) before this returns."""
    out = [Stream(port, max_tokens) for _ in range(n)]
    end = time.monotonic() + 60
    assert all(st.started.wait(max(0.0, end - time.monotonic())) for st in out), "a stream did not start"
    return out


def _join(streams, seconds: float) -> None:
    end = time.monotonic() + seconds
    for st in streams:
        st.thread.join(max(0.0, end - time.monotonic()))
    assert not any(st.thread.is_alive() for st in streams), "a stream hung"


def test_sigterm_lets_running_requests_finish_refuses_new_ones_and_exits_0():
    """4 streams of 300 tokens on one slot (one decoding, three queued); SIGTERM once all are accepted: /health and
    a new chat get 503 "draining", all 4 finish with every token, the process exits 0 and the port closes."""
    grace = 30
    s = Server("--parallel", "1", "--max-queue", "8", "--grace-period", str(grace))
    try:
        streams = _streams(s.port, 4, 300)
        t_sig = time.monotonic()
        os.kill(s.proc.pid, signal.SIGTERM)
        _draining_refusal(s.port, "GET", "/health")
        _draining_refusal(s.port, "POST", "/v1/chat/completions",
                          {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        t_probed = time.monotonic()
        _join(streams, grace)
        rc = s.proc.wait(timeout=grace)
        took = time.monotonic() - t_sig
        assert rc == 0 and took < grace, (rc, took)
        assert all(st.complete() for st in streams), [(st.status, st.done, st.usage, st.finish, st.error)
                                                      for st in streams]
        assert max(st.t_end for st in streams) > t_probed     # the refusals came while requests still ran
        assert _refused(s.port)
        log = s.log()
        assert "SIGTERM: draining" in log and "Traceback" not in log, log[-2000:]
        print(f"drained 4 x 300 tokens in {took:.1f} s; refusals answered {t_probed - t_sig:.2f} s after SIGTERM")
    finally:
        s.stop()


@pytest.mark.parametrize("case", ["grace period over", "second signal"])
def test_the_drain_is_bounded(case):
    """24 streams of 400 tokens queued on one slot (many seconds of work): with --grace-period 1 (or a second
    signal, SIGINT then SIGTERM) the process still exits 0 within about a second, the unfinished answers cut."""
    grace = 1 if case == "grace period over" else 60
    s = Server("--parallel", "1", "--max-queue", "32", "--grace-period", str(grace))
    try:
        streams = _streams(s.port, 24, 400)
        t_sig = time.monotonic()
        if case == "grace period over":
            os.kill(s.proc.pid, signal.SIGTERM)
        else:
            os.kill(s.proc.pid, signal.SIGINT)
            time.sleep(0.5)
            os.kill(s.proc.pid, signal.SIGTERM)
        rc = s.proc.wait(timeout=30)
        took = time.monotonic() - t_sig
        assert rc == 0, (rc, s.log()[-2000:])
        assert took < (grace if case == "grace period over" else 0.5) + 2.5, took
        _join(streams, 30)
        finished = sum(st.complete() for st in streams)
        assert finished < len(streams), "all answers finished before the bound: nothing was cut"
        assert all(st.complete() or st.error or not st.done for st in streams)
        print(f"{case}: exit 0 {took:.1f} s after the signal; {finished}/24 answers finished, the rest cut")
    finally:
        s.stop()


def test_sigterm_while_the_models_load_exits_0(tmp_path):
    """A signal before anything runs (the server starting, its models loading): exit 0 at once."""
    import subprocess
    import sys
    port = _free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-c", "from edgemm.cli import main; main()", "serve", "--port",
                                 str(port), "--threads", "1"], stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        end = time.monotonic() + 60
        while "edgemm serve on" not in log.read_text() and proc.poll() is None and time.monotonic() < end:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ------------------------------------------------------------------------------------------------ Ray Serve
@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """A random-weight model a few times tiny-shapes' size (37 M parameters): ~10 ms a token on one thread, so
    a 300-token answer runs for seconds."""
    import torch
    from edgemm.checkpoint import save_checkpoint
    from edgemm.config import get_preset
    from edgemm.model import EdgeMM
    from tests.conftest import make_tokenizer
    cfg = get_preset("tiny-shapes")
    cfg.name = "slow-random"
    cfg.decoder.d_model, cfg.decoder.n_layers, cfg.decoder.ffn_dim, cfg.decoder.n_heads = 512, 4, 2048, 8
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("drain") / "slow-random"
    save_checkpoint(EdgeMM(cfg).init_weights(1), make_tokenizer(), out)
    return out


def _descendants(pid: int) -> list:
    import psutil
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None or importlib.util.find_spec("psutil") is None,
                    reason="needs the ray extra (pip install 'edgemm[ray]') and psutil")
def test_ray_sigterm_drains_then_shuts_serve_and_ray_down(slow_model):
    """`edgemm serve --ray` on its own local Ray (1 replica, 1 slot): SIGTERM to the driver while a 300-token
    stream runs: a new request gets 503 "draining", the stream finishes whole, the driver shuts Serve and Ray
    down and exits 0 (no native stack dump), and no process it started is left."""
    import psutil
    grace = 60
    s = Server("--ray", "--model", str(slow_model), "--threads", "1", "--parallel", "1", "--max-queue", "4",
               "--grace-period", str(grace))
    started = _descendants(s.proc.pid)                      # Ray's processes: gcs, raylet, workers, replicas
    try:
        assert started, "no Ray processes under the driver"
        (stream,) = _streams(s.port, 1, 300)
        t_sig = time.monotonic()
        os.kill(s.proc.pid, signal.SIGTERM)
        end = time.monotonic() + 10
        while "SIGTERM: draining" not in s.log() and time.monotonic() < end:
            time.sleep(0.1)
        time.sleep(1.0)                                      # the replica hears of it within 0.2 s
        assert stream.thread.is_alive(), "the stream ended before the probe: too fast a model for this test"
        _draining_refusal(s.port, "POST", "/v1/chat/completions",
                          {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        _join([stream], grace)
        assert stream.complete(), (stream.status, stream.done, stream.usage, stream.finish, stream.error)
        rc = s.proc.wait(timeout=grace)
        took = time.monotonic() - t_sig
        log = s.log()
        assert rc == 0 and took < grace, (rc, took, log[-3000:])
        assert "SIGTERM received" not in log and "Aborted" not in log and "stopped" in log, log[-3000:]
        gone_by = time.monotonic() + 30
        def alive():
            return [p.pid for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        while alive() and time.monotonic() < gone_by:
            time.sleep(0.5)
        left = alive()
        assert not left, f"processes the driver started still run: {left}"
        assert _refused(s.port)
        print(f"ray: drained and shut down, exit 0 {took:.1f} s after SIGTERM")
    finally:
        s.stop()
        for p in _descendants(s.proc.pid) + started:        # whatever is left, by its own pid
            try:
                p.kill()
            except psutil.Error:
                pass


@pytest.mark.skipif(importlib.util.find_spec("yaml") is None, reason="needs PyYAML (the ray extra)")
def test_ray_config_carries_the_grace_period(tmp_path):
    """`serve deploy` of a written config: Ray's own graceful shutdown waits the grace period; a bad one is refused
    in one line."""
    import yaml
    from click.testing import CliRunner
    from edgemm.cli import main
    out = tmp_path / "serve.yaml"
    r = CliRunner().invoke(main, ["serve", "--ray-config", str(out), "--grace-period", "7"])
    assert r.exit_code == 0, r.output
    app = yaml.safe_load(out.read_text())["applications"][0]
    assert app["deployments"][0]["graceful_shutdown_timeout_s"] == 7.0 and app["args"]["grace_period"] == 7.0
    r = CliRunner().invoke(main, ["serve", "--grace-period", "-1"])
    assert r.exit_code == 2 and r.output.strip() == "error: --grace-period must be a number of seconds >= 0, not -1.0"
