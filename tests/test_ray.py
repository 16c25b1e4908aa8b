"""`edgemm serve --ray`: the serve app on a local Ray Serve cluster (started by the test, stopped at its end)."""
from __future__ import annotations

import importlib.util
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import requires_demo

pytestmark = [pytest.mark.slow, requires_demo,
              pytest.mark.skipif(importlib.util.find_spec("ray") is None or importlib.util.find_spec("openai") is None
                                 or importlib.util.find_spec("onnxruntime") is None,
                                 reason="needs the ray extra (pip install 'edgemm[ray]'), onnxruntime and openai")]
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "shapes.png"
QUESTIONS = ["What color is the circle?", "How many shapes are there?", "Where is the red square?",
             "What shape is at the top left?"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from edgemm.export.onnx import export_onnx
    d = tmp_path_factory.mktemp("ray")
    export_onnx(model="tiny-shapes", out=d / "tiny-fp32", precision="fp32", log=None, seed=0, threads=1)
    export_onnx(model="tiny-shapes", out=d / "tiny-fp16", precision="fp16", log=None, seed=0, threads=1)
    return d / "tiny-fp32", d / "tiny-fp16"


@pytest.fixture(scope="module")
def expected():
    from edgemm.generation import GenerationConfig, answer
    from edgemm.runtimes import load_backend
    b = load_backend("torch", model="tiny-shapes", device="cpu")
    return {q: answer(b, str(EXAMPLE), q, GenerationConfig(max_new_tokens=16)) for q in QUESTIONS}


@pytest.fixture(scope="module")
def cluster(bundles):
    """A local Ray cluster with 2 replicas serving both bundles on a loopback port."""
    import ray
    from ray import serve
    from edgemm.serve import ray_app
    from edgemm.serve.app import Limits
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = ray_app.ray_args([], [str(b) for b in bundles], "ort", "cpu", 1, 2, 8, None, False, Limits(),
                                2, None, False)
        serve.run(ray_app.build_app(args), name=ray_app.APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _ask(url, q, model="tiny-fp32"):
    import base64
    import openai
    c = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    img = "data:image/png;base64," + base64.b64encode(EXAMPLE.read_bytes()).decode()
    raw = c.chat.completions.with_raw_response.create(
        model=model, temperature=0, max_tokens=16,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": img}},
                                                {"type": "text", "text": q}]}])
    return raw.parse().choices[0].message.content, raw.headers.get("x-edgemm-replica")


def test_two_replicas_share_40_requests_from_4_clients(cluster, expected):
    got, lock = [], threading.Lock()

    def client(k):
        for i in range(10):
            q = QUESTIONS[(k + i) % 4]
            a, replica = _ask(cluster, q)
            with lock:
                got.append((q, a, replica))
    ts = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    t0 = time.time()
    for t in ts:
        t.start()
    for t in ts:
        t.join(300)
    assert len(got) == 40 and time.time() - t0 < 300
    assert all(a == expected[q] for q, a, _ in got), [g for g in got if g[1] != expected[g[0]]][:3]
    replicas = {r for _, _, r in got}
    assert len(replicas) == 2 and None not in replicas, replicas


def test_two_bundles_behind_one_endpoint(cluster, expected):
    import openai
    assert _ask(cluster, QUESTIONS[0], "tiny-fp16")[0] == expected[QUESTIONS[0]]
    assert _ask(cluster, QUESTIONS[0], "tiny-fp32")[0] == expected[QUESTIONS[0]]
    with pytest.raises(openai.NotFoundError):
        _ask(cluster, QUESTIONS[0], "tiny-int3")
    c = openai.OpenAI(base_url=cluster + "/v1", api_key="none", max_retries=0)
    assert {m.id for m in c.models.list().data} == {"tiny-fp32", "tiny-fp16"}


def test_a_killed_replica_is_replaced_and_no_request_is_lost_or_wrong(cluster, expected):
    """60 requests from 3 clients; one replica's process is killed halfway. Every request ends with the right
    answer, directly or after retries of the failures Ray reports for the requests the dead replica held."""
    import json
    import openai
    import urllib.request

    def replicas():                                   # {replica id: pid}, from /health over a few requests
        seen = {}
        for _ in range(12):
            try:
                with urllib.request.urlopen(cluster + "/health", timeout=10) as r:
                    h = json.loads(r.read())
                seen[h["replica"]] = h["pid"]
            except OSError:
                pass
        return seen
    before = replicas()
    assert len(before) == 2, before
    outcomes, codes, lock = [], [], threading.Lock()

    def client(k):
        for i in range(20):
            q = QUESTIONS[(k + i) % 4]
            for attempt in range(20):
                try:
                    a, _ = _ask(cluster, q)
                    with lock:
                        outcomes.append((q, a, attempt))
                    break
                except (openai.APIStatusError, openai.APIConnectionError) as e:
                    code = getattr(e, "status_code", None)
                    with lock:
                        codes.append(code)
                    assert code in (None, 500, 502, 503), f"unexpected status {code}"
                    time.sleep(0.5)
            else:
                with lock:
                    outcomes.append((q, None, 20))
    ts = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for t in ts:
        t.start()
    while len(outcomes) < 15:
        time.sleep(0.1)
    victim = sorted(before.values())[0]
    os.kill(victim, signal.SIGKILL)
    for t in ts:
        t.join(600)
    assert len(outcomes) == 60
    assert all(a == expected[q] for q, a, _ in outcomes), [o for o in outcomes if o[1] != expected[o[0]]][:3]
    deadline = time.time() + 120                          # Ray brings the replica count back to 2
    while time.time() < deadline:
        now = replicas()
        if len(now) == 2 and victim not in now.values():
            break
        time.sleep(1)
    assert len(now) == 2 and victim not in now.values(), now
    print(f"failures seen and retried: {codes} (status codes; None: connection dropped)")
