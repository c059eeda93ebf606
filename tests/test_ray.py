"""impasto on Ray Serve: a local Ray cluster (2 CPUs, no dashboard) started once for the
module, the app deployed on it by `impasto serve --ray --replicas 2` itself (a subprocess
joining through RAY_ADDRESS), 2 replicas over the tiny fixture model, real HTTP through Ray's
proxy (httpx), images compared with an in-process engine.generate. The routing helpers are
tested without Ray."""

import base64
import io
import json
import os
import socket
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from impasto.api import Adapter, Request
from impasto.serve.ray.directory import Directory
from impasto.serve.ray.routing import Spreader, adapter_of, routing_key
from test_serve import OUT, Q, Server, _lora, ref  # noqa: F401  (ref: the fixture, over this module's adapter_dir)

USER, ADMIN = "user-key-0123456789abcdef", "admin-key-0123456789abcdef"
NAMES = [f"a{i}" for i in range(6)]
APP = "impasto"  # the name `impasto serve --ray` deploys under


def _wait(cond, seconds):
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


# ---------------------------------------------------------------------------------- no Ray
def test_routing_key_is_the_first_adapter():
    assert routing_key(Request("x")) is None
    assert routing_key(Request("x", adapters=["b", "a"])) == "b"
    assert routing_key(Request("x", adapters=[("c", 0.5), ("a", 1.0)])) == "c"
    assert routing_key(Request("x", adapters=[Adapter("d", 0.7), "a"])) == "d"


def test_spreader_moves_a_hot_adapter_to_further_ids_and_back():
    s = Spreader(replicas=3, spread_above=2)
    r = Request("x", adapters=["hot"])
    keys = [s.key(r) for _ in range(7)]
    assert keys == ["hot", "hot", "hot~1", "hot~1", "hot~2", "hot~2", "hot"]  # wraps at the replica count
    assert {adapter_of(k) for k in keys} == {"hot"} and s.spread == 4
    assert s.key(Request("x", adapters=["cold"])) == "cold"  # counted per adapter
    for k in keys:
        s.done(k)
    assert s.in_flight == {"cold": 1}
    assert s.key(r) == "hot"  # nothing in flight: back on its own id
    with pytest.raises(ValueError):
        Spreader(replicas=0, spread_above=1)


def test_directory_replays_its_log_to_a_late_replica():
    d = Directory()
    assert d.report("r1", 0, {}, {"n": 0}) == []
    assert d.append("register", {"name": "x", "path": "/p"}) == 1
    assert d.append("unregister", {"name": "x"}) == 2
    assert d.report("r1", 0, {}, {}) == [(1, "register", {"name": "x", "path": "/p"}), (2, "unregister", {"name": "x"})]
    assert d.report("r1", 2, {1: ("ok", None), 2: ("ok", None)}, {}) == []
    assert [seq for seq, _, _ in d.report("r2", 0, {}, {})] == [1, 2]  # a replacement replays everything
    state = d.state()
    assert set(state) == {"r1", "r2"} and state["r1"]["applied"] == 2 and set(state["r1"]["results"]) == {1, 2}
    d.forget("r1")
    assert set(d.state()) == {"r2"}
    assert d.count("i1", {"hit": 2, "miss": 1}) == {"hit": 2, "miss": 1}
    assert d.count("i2", {"hit": 1}) == {"hit": 3, "miss": 1}  # every ingress replica's decisions
    assert d.count("i1", {"hit": 3, "miss": 1}) == {"hit": 4, "miss": 1}  # counters replace, not add


def test_cli_serve_ray_flags_are_checked_before_ray_starts(tmp_path, capsys):
    from impasto.cli import build_parser, main

    args = build_parser().parse_args(["serve", "--ray", "--replicas", "3", "--adapters", str(tmp_path)])
    assert args.ray and args.replicas == 3
    assert not build_parser().parse_args(["serve", "--adapters", str(tmp_path)]).ray
    assert main(["serve", "--ray", "--replicas", "0", "--adapters", str(tmp_path)]) == 2
    assert "--replicas 0" in capsys.readouterr().err
    assert main(["serve", "--ray", "--port", "0", "--adapters", str(tmp_path)]) == 2
    assert "--port 0" in capsys.readouterr().err
    assert main(["serve", "--ray", "--host", "0.0.0.0", "--adapters", str(tmp_path)]) == 2
    assert "beyond loopback" in capsys.readouterr().err


def test_warm_puts_an_adapter_in_the_slot_pool_only_at_a_free_step_boundary(engine, tmp_path):
    """The multiplexed loader's engine.warm: host cache, then a slot if the worker's boundary
    is free within `wait`; never waits longer."""
    from impasto.errors import AdapterNameError

    engine.adapters.register("warm-a", _lora(tmp_path / "a.safetensors", 5))
    engine.adapters.register("warm-b", _lora(tmp_path / "b.safetensors", 6, key=OUT))
    try:
        assert "warm-a" not in engine.lora.adapter_bucket
        loads = engine.adapters.stats()["loads"]
        assert engine.warm("warm-a", wait=5.0)
        assert "warm-a" in engine.lora.adapter_bucket and engine.adapters.stats()["loads"] == loads + 1
        held = threading.Event()
        release = threading.Event()

        def hold():  # a step in progress
            with engine._worker.boundary:
                held.set()
                release.wait(30)

        t = threading.Thread(target=hold)
        t.start()
        try:
            assert held.wait(30)
            t0 = time.monotonic()
            assert not engine.warm("warm-b", wait=0.2)
            assert 0.15 < time.monotonic() - t0 < 5
        finally:
            release.set()
            t.join(30)
        assert "warm-b" not in engine.lora.adapter_bucket  # in the host cache only: admission copies it
        assert engine.adapters.stats()["loads"] == loads + 2
        with pytest.raises(AdapterNameError):
            engine.warm("no-such-adapter")
    finally:
        engine.adapters.unregister("warm-a")
        engine.adapters.unregister("warm-b")


def test_a_submit_that_waits_does_not_hold_up_the_ingress_loop():
    """A remote backend's submit can wait seconds (a replica starting, Ray's queue full); the
    HTTP app runs it off its event loop, so other clients' polls and event streams go on."""
    import asyncio

    from impasto import LIMITS
    from impasto.errors import EngineBusyError
    from impasto.serve.app import create_app

    release = threading.Event()

    class Waiting:
        model_name, sampler, limits, default_size = "m", "Euler", dict(LIMITS), (32, 32)

        def submit(self, request):
            release.wait(30)
            raise EngineBusyError("full")

        def adapters(self):
            return []

        def stats(self):
            return {"alive": True, "queued": 0, "running": 0, "forwards": 0, "rows_last_forward": 0,
                    "adapter_cache": {}}

        def close(self):
            release.set()

    async def scenario():
        transport = httpx.ASGITransport(app=create_app(Waiting()))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            post = asyncio.ensure_future(c.post("/v1/jobs", json={"prompt": "x", "num_inference_steps": 2}))
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            assert (await asyncio.wait_for(c.get("/ready"), 10)).status_code == 200
            waited = time.monotonic() - t0
            assert not post.done()
            release.set()
            assert (await asyncio.wait_for(post, 30)).status_code == 429
            return waited

    assert asyncio.run(scenario()) < 5


def test_build_refuses_a_missing_adapter_root(tmp_path):
    from impasto.serve.ray import app, build

    with pytest.raises(ValueError, match="not a folder"):
        build("tiny", str(tmp_path / "none"))
    with pytest.raises(ValueError, match="not a folder"):
        app({"replicas": "2"})
    with pytest.raises(ValueError, match="replicas"):
        build("tiny", str(tmp_path), replicas=0)


# ---------------------------------------------------------------------------------- the cluster
ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ray-adapters")
    for i, name in enumerate(NAMES):
        _lora(d / f"{name}.safetensors", 100 + i, key=Q if i % 2 else OUT)
    return d


@pytest.fixture(scope="module")
def server(tiny_dir, adapter_dir, tmp_path_factory):
    """One local Ray cluster for the module, and `impasto serve --ray` deploying the app on it
    (2 replicas, one ingress: with two, each ingress's router places a cold adapter on its own,
    so the first round's concurrent requests could load one adapter on both replicas); every
    wait below is bounded."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    keys = tmp_path_factory.mktemp("ray-keys")
    (keys / "user").write_text(USER + "\n")
    (keys / "admin").write_text(ADMIN + "\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    try:
        proc = Server("--ray", "--replicas", "2", "--port", str(port), "--model", tiny_dir, "--adapters",
                      str(adapter_dir), "--api-key-file", str(keys / "user"), "--admin-key-file", str(keys / "admin"))
    finally:
        del os.environ["RAY_ADDRESS"]
    try:
        proc.wait()  # bounded: the 'listening on' line within 180 s
        assert proc.url == f"http://127.0.0.1:{port}" and "2 replicas" in proc.log, proc.log
        assert _app_status() == "RUNNING"
        yield proc
    finally:
        proc.stop()
        ray.shutdown()


@pytest.fixture(scope="module")
def cluster(server):
    return server.url


@pytest.fixture
def user(cluster):
    with httpx.Client(base_url=cluster, headers={"Authorization": f"Bearer {USER}"}, timeout=120) as c:
        yield c


def _app_status():
    app = serve.status().applications.get(APP)
    assert app is None or app.status not in ("DEPLOY_FAILED", "UNHEALTHY"), app
    return app and app.status


def _directory():
    """The app's registration log (directory.py), named per deployment."""
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
               if a["namespace"] == "impasto" and a["name"].startswith(f"impasto-directory-{APP}-")]
    return ray.get_actor(name, namespace="impasto")


def _replicas() -> dict:
    """{replica id: stats} of the live replicas, as they last reported."""
    return {rid: r["stats"] for rid, r in ray.get(_directory().state.remote(), timeout=30).items()}


def _same_image(b64: str, expected):
    a = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=int)
    b = np.asarray(expected, dtype=int)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1  # batched rows equal solo runs to 1e-4


def _body(name, seed, steps=3):
    return {"prompt": "a red star", "seed": seed, "num_inference_steps": steps, "guidance_scale": 6.0,
            "size": "32x32", "adapters": [{"name": name, "scale": 0.8}]}


def _generate_all(user, ref, seed):
    """One request per adapter, all at once; each image must equal engine.generate."""
    results = {}

    def one(name):
        results[name] = user.post("/v1/images/generations", json=_body(name, seed))

    threads = [threading.Thread(target=one, args=(n,)) for n in NAMES]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    for name in NAMES:
        r = results[name]
        assert r.status_code == 200, r.text
        want = ref.generate("a red star", adapters=[(name, 0.8)], guidance=6.0, steps=3, seed=seed,
                            height=32, width=32).images[0]
        _same_image(r.json()["data"][0]["b64_json"], want)


def test_six_adapters_served_equal_generate_each_loaded_on_one_replica(user, ref):
    _generate_all(user, ref, seed=1)
    assert _wait(lambda: sum(len(s["multiplexed"]) for s in _replicas().values()) == len(NAMES), 10), _replicas()
    time.sleep(1.0)  # replicas push their loaded ids to Ray's routers every 0.1 s (through the controller)
    _generate_all(user, ref, seed=2)
    assert _wait(lambda: sum(s["requests"] for s in _replicas().values()) >= 12, 10)
    per = _replicas()
    assert len(per) == 2
    for name in NAMES:
        # the multiplexed loader ran once in the cluster, and that replica saw the key through
        # serve.get_multiplexed_model_id() for both requests
        loaders = [rid for rid, s in per.items() if s["loads_by_key"].get(name)]
        assert len(loaders) == 1, (name, {rid: s["loads_by_key"] for rid, s in per.items()})
        assert per[loaders[0]]["loads_by_key"][name] == 1
        assert per[loaders[0]]["seen_by_key"][name] == 2, (name, per)
        assert not any(s["seen_by_key"].get(name) for rid, s in per.items() if rid != loaders[0])
    assert sum(s["adapter_cache"]["loads"] for s in per.values()) == len(NAMES)  # each file read once
    assert sum(s["affinity_hits"] for s in per.values()) == len(NAMES)  # the second round, every one
    # summed over the ingress replicas, each adding its counters every 0.2 s
    assert _wait(lambda: 'impasto_routing_total{decision="hit"} 6.0' in user.get("/metrics").text, 10)
    metrics = user.get("/metrics").text
    assert 'impasto_routing_total{decision="hit"} 6.0' in metrics
    assert 'impasto_routing_total{decision="miss"} 6.0' in metrics
    assert metrics.count("impasto_replica_adapter_loads_total{") == 2


def test_refusals_come_back_at_once_with_their_status(user):
    r = user.post("/v1/images/generations", json=_body("no-such-adapter", 1))
    assert r.status_code == 422 and r.json()["error"]["type"] == "adapter_not_found", r.text
    r = user.post("/v1/images/generations", json=_body("a0", 1, steps=10_000))
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request_error", r.text
    assert user.get("/ready").json()["status"] == "ready"


def test_a_job_and_its_event_stream_reach_its_replica(user, ref):
    r = user.post("/v1/jobs", json=_body("a3", 7, steps=4))
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    events = []
    with user.stream("GET", f"/v1/jobs/{job}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
            elif line.startswith("data: ") and events[-1] == "result":
                result = json.loads(line[6:])
    assert events == ["progress"] * 4 + ["result"], events
    want = ref.generate("a red star", adapters=[("a3", 0.8)], guidance=6.0, steps=4, seed=7, height=32,
                        width=32).images[0]
    _same_image(result["result"]["data"][0]["b64_json"], want)
    status = user.get(f"/v1/jobs/{job}").json()
    assert status["state"] == "succeeded" and status["progress"] == {"step": 4, "total": 4}


def _events(user, job):
    """The job's event stream: (event names, the result event's data)."""
    events, result = [], None
    with user.stream("GET", f"/v1/jobs/{job}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
            elif line.startswith("data: ") and events[-1] == "result":
                result = json.loads(line[6:])
    return events, result


def test_a_job_outlives_an_ingress_restart(cluster, user, ref):
    """The job id names the replica holding the job, so fresh ingress replicas (none has seen
    the job) answer GET /v1/jobs/{id} and its event stream."""
    r = user.post("/v1/jobs", json=_body("a2", 11, steps=24))
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    replica, _, key = job.rpartition("-")
    assert replica in _replicas() and len(key) == 16, job
    ingresses = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith(f"SERVE_REPLICA::{APP}#Ingress#")]
    assert ingresses
    for ingress in ingresses:
        ray.kill(ray.get_actor(ingress, namespace="serve"), no_restart=True)  # Serve starts others

    def answered():
        try:
            return user.get(f"/v1/jobs/{job}", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    assert _wait(answered, 120)
    new = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
           if a["name"].startswith(f"SERVE_REPLICA::{APP}#Ingress#")]
    assert new and not set(new) & set(ingresses), new
    events, result = _events(user, job)
    assert events[-1] == "result" and set(events[:-1]) <= {"progress"}, events
    want = ref.generate("a red star", adapters=[("a2", 0.8)], guidance=6.0, steps=24, seed=11, height=32,
                        width=32).images[0]
    _same_image(result["result"]["data"][0]["b64_json"], want)
    assert user.get(f"/v1/jobs/{job}").json()["progress"] == {"step": 24, "total": 24}
    other = httpx.get(f"{cluster}/v1/jobs/{job}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    assert other.status_code == 404  # another caller's job does not exist for it
    for bad in (f"{replica}-0000000000000000", "nonsense", f"{job}_{job}"[:-1]):
        assert user.get(f"/v1/jobs/{bad}").status_code == 404, bad


def test_cancelling_a_kept_job_reaches_its_replica(user):
    r = user.post("/v1/jobs", json=_body("a1", 12, steps=200))
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    assert _wait(lambda: user.get(f"/v1/jobs/{job}").json()["progress"]["step"] > 0, 60)
    assert user.delete(f"/v1/jobs/{job}").status_code == 202
    assert _wait(lambda: user.get(f"/v1/jobs/{job}").json()["state"] == "cancelled", 30)
    assert _wait(lambda: not any(s["running"] for s in _replicas().values()), 10)


def test_serve_run_builds_the_app_from_its_import_path(adapter_dir):
    """What `serve run impasto.serve.ray:app adapters=DIR replicas=3` does before deploying."""
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    app = call_user_app_builder_with_args_if_necessary(import_attr("impasto.serve.ray:app"),
                                                       {"adapters": str(adapter_dir), "replicas": "3"})
    assert isinstance(app, Application)
    replica = app._bound_deployment.init_args[0]  # Ingress.bind(Replica.bind(...), ...)
    assert replica._bound_deployment.num_replicas == 3


def test_an_upload_reaches_every_replica(cluster, user, ref, tmp_path):
    path = _lora(tmp_path / "up.safetensors", 77)
    with open(path, "rb") as f:
        r = httpx.post(f"{cluster}/v1/adapters", files={"file": ("up.safetensors", f.read())},
                       headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    assert r.status_code == 201, r.text
    assert _wait(lambda: [s["adapters"] for s in _replicas().values()] == [7, 7], 10), _replicas()
    ref.adapters.register("up", path)
    try:
        got = user.post("/v1/images/generations", json=_body("up", 3))
        assert got.status_code == 200, got.text
        want = ref.generate("a red star", adapters=[("up", 0.8)], guidance=6.0, steps=3, seed=3, height=32,
                            width=32).images[0]
        _same_image(got.json()["data"][0]["b64_json"], want)
    finally:
        ref.adapters.unregister("up")
    r = httpx.delete(f"{cluster}/v1/adapters/up", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    assert r.status_code == 200, r.text
    assert _wait(lambda: [s["adapters"] for s in _replicas().values()] == [6, 6], 10), _replicas()
    r = user.post("/v1/images/generations", json=_body("up", 3))
    assert r.status_code == 422 and r.json()["error"]["type"] == "adapter_not_found"


def test_a_replica_killed_mid_stream_is_replaced_and_retries_complete(user, ref):
    """Last in the module: it kills a replica."""
    r = user.post("/v1/jobs", json={**_body("a5", 9, steps=200), "size": "64x64"})  # long enough to kill mid-way
    assert r.status_code == 202, r.text
    job = r.json()["id"]
    assert _wait(lambda: user.get(f"/v1/jobs/{job}").json()["progress"]["step"] > 0, 60)
    assert _wait(lambda: any(s["running"] for s in _replicas().values()), 10)
    (victim,) = [rid for rid, s in _replicas().items() if s["running"]]
    ray.kill(ray.get_actor(f"SERVE_REPLICA::{APP}#Replica#{victim}", namespace="serve"), no_restart=True)
    assert _wait(lambda: user.get(f"/v1/jobs/{job}").json()["state"] == "failed", 30)
    error = user.get(f"/v1/jobs/{job}").json()["error"]
    assert error["type"] == "unavailable" and victim in error["message"] and "retry" in error["message"]

    def retried(name, seed):
        """What a client does with a 503: try again, a bounded number of times."""
        for _ in range(60):
            got = user.post("/v1/images/generations", json=_body(name, seed))
            if got.status_code != 503:
                return got
            time.sleep(1.0)
        return got

    for name in ("a5", "a0"):
        got = retried(name, 4)
        assert got.status_code == 200, got.text
        want = ref.generate("a red star", adapters=[(name, 0.8)], guidance=6.0, steps=3, seed=4, height=32,
                            width=32).images[0]
        _same_image(got.json()["data"][0]["b64_json"], want)

    def replaced():
        per = _replicas()
        return len(per) == 2 and victim not in per and all(s["adapters"] == 6 for s in per.values())

    def running():
        return serve.status().applications[APP].deployments["Replica"].replica_states.get("RUNNING") == 2

    assert _wait(replaced, 180), _replicas()
    assert _wait(running, 60), serve.status().applications[APP].deployments["Replica"]


def test_the_cli_stops_on_sigterm(server):
    """Last: `impasto serve --ray` deletes the app and exits 0 on SIGTERM."""
    server.stop()
    assert server.proc.returncode == 0 and "impasto serve --ray: stopped" in server.log, server.log
