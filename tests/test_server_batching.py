"""`harmon serve` draws waiting text-to-image requests of equal settings in one sampling loop: each answer is
the one the request gets alone, incompatible requests are not merged, and a failing or cancelled request
leaves its batch-mates' answers alone. The worker's batching first without a model, then through the app."""
from __future__ import annotations

import asyncio
import http.client
import json
import subprocess
import sys
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")

from harmon.errors import InputError  # noqa: E402
from harmon.server import Engine, ServerSettings, create_app  # noqa: E402
from harmon.server.errors import ApiError  # noqa: E402
from harmon.server.worker import Batchable, ModelWorker  # noqa: E402
from test_server import REPO, TINY, Server, sse_data  # noqa: E402


# -- the worker, with stand-in jobs -----------------------------------------------------------------
def _drive(worker: ModelWorker, submit_all) -> list:
    """Hold the worker on a gate job, queue what ``submit_all(loop, calls)`` submits, release it and gather
    every job's outcome (result or ApiError); returns (outcomes, calls)."""
    calls: list = []

    async def main():
        loop = asyncio.get_running_loop()
        gate, running = threading.Event(), threading.Event()
        worker.submit(lambda job: running.set() or gate.wait(30), loop)
        while not running.is_set():
            await asyncio.sleep(0.01)
        jobs = submit_all(loop, calls)
        gate.set()
        return await asyncio.gather(*(job.result() for job in jobs), return_exceptions=True)

    worker.start()
    try:
        return [asyncio.run(main()), calls]
    finally:
        worker.stop()


def _batchable(key, size: int, item, calls: list, fail: bool = False) -> Batchable:
    def run(items, jobs):
        calls.append(("batch", list(items)))
        if fail:
            raise RuntimeError("the batch broke")
        return [f"{item} in a batch" for item in items]

    return Batchable(key, size, item, run)


def test_worker_draws_equal_keys_together_in_queue_order_within_max_batch():
    worker = ModelWorker(queue_size=8, max_batch=4)

    def submit_all(loop, calls):
        def alone(name):
            return lambda job: calls.append(("alone", name)) or f"{name} alone"

        spec = [("a", 1, 1), ("b", 2, 1), ("c", 1, 2), ("d", 1, 2), ("e", 1, 1)]  # (name, key, size)
        return [worker.submit(alone(name), loop, _batchable(key, size, name, calls)) for name, key, size in spec]

    outcomes, calls = _drive(worker, submit_all)
    # a, c and e share key 1 and fit in 4 rows; d (2 more rows) waits and runs alone, as does b (key 2)
    assert calls == [("batch", ["a", "c", "e"]), ("alone", "b"), ("alone", "d")]
    assert outcomes == ["a in a batch", "b alone", "c in a batch", "d alone", "e in a batch"]
    assert worker.batches == 1 and worker.completed == 6  # the gate job counts too


def test_max_batch_one_runs_every_job_alone():
    worker = ModelWorker(queue_size=4, max_batch=1)
    outcomes, calls = _drive(worker, lambda loop, calls: [
        worker.submit(lambda job, k=k: calls.append(k) or k, loop, _batchable(0, 1, k, calls)) for k in range(3)])
    assert outcomes == [0, 1, 2] and calls == [0, 1, 2] and worker.batches == 0


def test_a_failing_batch_runs_its_jobs_alone_and_a_cancelled_job_is_dropped():
    worker = ModelWorker(queue_size=8, max_batch=8)

    def submit_all(loop, calls):
        def alone(name):
            def fn(job):
                calls.append(("alone", name))
                if name == "bad":
                    raise InputError("this request cannot be drawn")
                return f"{name} alone"
            return fn

        jobs = [worker.submit(alone(name), loop, _batchable("k", 1, name, calls, fail=True))
                for name in ("x", "bad", "gone", "y")]
        jobs[2].cancel()  # its client went away while it waited
        return [job for job in jobs if job is not jobs[2]]

    outcomes, calls = _drive(worker, submit_all)
    assert calls == [("batch", ["x", "bad", "y"]), ("alone", "x"), ("alone", "bad"), ("alone", "y")]
    assert outcomes[0] == "x alone" and outcomes[2] == "y alone"
    assert isinstance(outcomes[1], ApiError) and outcomes[1].status == 400 and "cannot be drawn" in str(outcomes[1])
    assert worker.failed == 1


@pytest.mark.parametrize("options", [{"max_batch": 0}, {"max_batch": 257}, {"batch_wait": -0.1}, {"batch_wait": 11}])
def test_worker_refuses_bad_batch_options(options):
    with pytest.raises(InputError, match="max_batch|batch_wait"):
        ModelWorker(**options)


def test_serve_refuses_bad_batch_options(tiny_model_dir):
    for flag, value in (("--max-batch", "0"), ("--batch-wait-ms", "nan")):
        result = subprocess.run([sys.executable, "-m", "harmon.cli", "serve", "--model", str(tiny_model_dir), flag,
                                 value], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and flag in result.stderr, result.stderr


# -- through the app ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    from harmon.checkpoint import load_model
    from harmon.hub import load_tokenizer

    model = load_model(tiny_model_dir, dtype=torch.float32)
    return Engine(model, load_tokenizer(tiny_model_dir, int(model.config.llm["vocab_size"])), tiny_model_dir,
                  image_size=64)


@pytest.fixture(scope="module")
def server(engine):
    s = Server(create_app(engine, ServerSettings(queue_size=8, max_batch=8, **TINY)))
    yield s
    s.stop()


@pytest.fixture()
def batches(engine, monkeypatch) -> list[list[str]]:
    """The prompts of every batch the engine draws while the test runs."""
    drawn: list[list[str]] = []
    generate_batch = engine.generate_batch

    def spy(params, jobs):
        drawn.append([p.prompt for p in params])
        return generate_batch(params, jobs)

    monkeypatch.setattr(engine, "generate_batch", spy)
    return drawn


def _post(port: int, body: dict) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", "/v1/images/generations", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _images(status: int, raw: bytes) -> list[str]:
    """The base64 PNGs of an answer, plain or streamed."""
    assert status == 200, raw[:300]
    if raw.startswith(b"{"):
        return [d["b64_json"] for d in json.loads(raw)["data"]]
    events = [json.loads(d) for d in sse_data(raw)]
    return [e["b64_json"] for e in events if e["type"] == "image_generation.completed"]


def _concurrently(server: Server, bodies: list[dict]) -> list[tuple[int, bytes]]:
    """Send ``bodies`` while the worker is held, so that they all wait in its queue, then let it go."""
    worker = server.app.state.worker
    gate, running, loop = threading.Event(), threading.Event(), asyncio.new_event_loop()
    answers: list = [None] * len(bodies)
    try:
        worker.submit(lambda job: running.set() or gate.wait(60), loop)
        assert running.wait(10)
        threads = [threading.Thread(target=lambda i=i, b=b: answers.__setitem__(i, _post(server.port, b)))
                   for i, b in enumerate(bodies)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while worker.waiting < len(bodies):
            assert time.monotonic() < deadline, "the requests did not reach the queue"
            time.sleep(0.01)
    finally:
        gate.set()
        loop.close()
    for t in threads:
        t.join(120)
    return answers


def test_concurrent_requests_equal_the_same_requests_one_by_one(server, batches):
    bodies = [{"prompt": "a red circle", "seed": 3},
              {"prompt": "two green triangles on the left of a big blue square", "seed": 4, "n": 2},
              {"prompt": "a yellow square", "seed": 5, "stream": True},
              {"prompt": "a red circle", "seed": 9}]
    together = [_images(*answer) for answer in _concurrently(server, bodies)]
    assert [sorted(b) for b in batches] == [sorted(b["prompt"] for b in bodies)]  # one sampling loop of 5 images
    alone = [_images(*_post(server.port, body)) for body in bodies]  # nothing else waits: each alone
    assert len(batches) == 1
    assert together == alone  # the same PNG files, bit for bit
    assert len({png for answer in together for png in answer}) == 5


def test_requests_with_different_settings_are_not_merged(server, batches):
    bodies = [{"prompt": "a red circle", "seed": 1, "num_iter": 3},
              {"prompt": "a blue square", "seed": 2, "num_iter": 2},
              {"prompt": "a green circle", "seed": 3, "num_iter": 3},
              {"prompt": "a red circle", "seed": 4, "num_iter": 3, "guidance_scale": 2.0},
              {"prompt": "a cat", "seed": 5, "num_iter": 3, "size": "32x64"}]
    together = [_images(*answer) for answer in _concurrently(server, bodies)]
    assert [sorted(b) for b in batches] == [["a green circle", "a red circle"]]  # the others differ: drawn alone
    assert together == [_images(*_post(server.port, body)) for body in bodies]


def test_a_failing_or_cancelled_request_leaves_its_batch_mates(server, engine, batches, monkeypatch):
    pipeline = engine.text_to_image

    def failing(prompts, *args, **kwargs):
        if any("FAIL" in p for p in ([prompts] if isinstance(prompts, str) else prompts)):
            raise InputError("the model cannot draw FAIL")
        return pipeline(prompts, *args, **kwargs)

    monkeypatch.setattr(engine, "text_to_image", failing)
    bodies = [{"prompt": "a red circle", "seed": 1}, {"prompt": "FAIL", "seed": 2}, {"prompt": "a blue square", "seed": 3}]
    answers = _concurrently(server, bodies)
    assert answers[1][0] == 400 and "cannot draw FAIL" in json.loads(answers[1][1])["error"]["message"]
    assert [_images(*answers[0]), _images(*answers[2])] == [_images(*_post(server.port, bodies[0])),
                                                            _images(*_post(server.port, bodies[2]))]
    assert [sorted(b) for b in batches] == [["FAIL", "a blue square", "a red circle"]]  # then each alone

    # a streamed request whose client leaves after the first progress event
    worker, batches[:] = server.app.state.worker, []
    long = {"num_iter": 40}
    left = threading.Event()

    def leave():
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", "/v1/images/generations", json.dumps({"prompt": "gone", "seed": 7, "stream": True,
                                                                   **long}), {"Content-Type": "application/json"})
        response = conn.getresponse()
        while b"image_generation.progress" not in response.readline():
            pass
        conn.close()
        left.set()

    gate, running, loop = threading.Event(), threading.Event(), asyncio.new_event_loop()
    worker.submit(lambda job: running.set() or gate.wait(60), loop)
    assert running.wait(10)
    leaving = threading.Thread(target=leave)
    leaving.start()
    stay: list = []
    staying = threading.Thread(target=lambda: stay.append(_post(server.port, {"prompt": "a red circle", "seed": 1,
                                                                              **long})))
    while worker.waiting < 1:
        time.sleep(0.01)
    staying.start()
    while worker.waiting < 2:
        time.sleep(0.01)
    gate.set()
    leaving.join(60)
    staying.join(120)
    loop.close()
    assert left.is_set() and batches == [["gone", "a red circle"]]
    assert _images(*stay[0]) == _images(*_post(server.port, {"prompt": "a red circle", "seed": 1, **long}))


def test_load_test_compares_batching_on_and_off(tiny_model_dir):
    result = subprocess.run([sys.executable, str(REPO / "benchmarks/load_test.py"), "--compare-batching",
                             "--model", str(tiny_model_dir), "--size", "64", "--num-iter", "2", "--num-steps", "2",
                             "--clients", "1,3", "--duration", "2", "--json"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert [row["clients"] for row in report["comparison"]] == [1, 3]
    for row in report["comparison"]:
        assert row["images_per_s"]["on"] > 0 and row["images_per_s"]["off"] > 0 and row["ratio"] > 0
        assert row["p95_ms"]["on"] >= row["p50_ms"]["on"] > 0
    assert all(r["failed"] == 0 and r["rejected_429"] == 0 and set(r["completed_by_kind"]) == {"image"}
               for r in report["on"] + report["off"])
