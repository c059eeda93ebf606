"""`impasto serve` as a client sees it: real server processes on ephemeral loopback ports, a
real HTTP client (httpx), images compared with an in-process engine.generate, a real headless
browser for the page."""

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import impasto

Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
OUT = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
USER, OTHER, ADMIN = "user-key-0123456789abcdef", "other-key-0123456789abcdef", "admin-key-0123456789abcdef"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lora(path, seed, *, key=Q, metadata=None):
    g = torch.Generator().manual_seed(seed)
    safetensors.torch.save_file({f"unet.{key}.lora_A.weight": torch.randn(4, 32, generator=g),
                                 f"unet.{key}.lora_B.weight": torch.randn(32, 4, generator=g)}, str(path),
                                metadata=metadata)
    return str(path)


class Server:
    """`python -m impasto.cli serve ...` on port 0; `url` parsed from its 'listening on' line."""

    def __init__(self, *args):
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes share the CI machine's 2 cores
        self.proc = subprocess.Popen([sys.executable, "-m", "impasto.cli", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines, self.ready = [], threading.Event()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = None

    def wait(self) -> "Server":
        assert self.ready.wait(180), "server did not start:\n" + self.log
        m = re.search(r"listening on (http://\S+)", self.log)
        assert m, "server did not start:\n" + self.log
        self.url = m.group(1)
        return self

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if "listening on" in line:
                self.ready.set()
        self.ready.set()

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def client(self, key=None, **kw):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=kw.pop("timeout", 120), **kw)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    for i in range(8):
        _lora(d / f"l{i}.safetensors", i, key=Q if i % 2 else OUT)
    _lora(d / "wc.safetensors", 50, metadata={"impasto.family": "style", "impasto.style_suffix": "in watercolor"})
    return d


@pytest.fixture(scope="module")
def ref(tiny_dir, adapter_dir):
    """The in-process engine every served image must equal."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    e = impasto.Engine.from_pretrained(tiny_dir, device="cpu")
    assert not e.adapters.register_dir(str(adapter_dir))
    yield e
    e.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def servers(tiny_dir, adapter_dir, tmp_path_factory):
    """Both servers of this module, started together (their imports and loading overlap):
    the main one with API and admin keys; a keyless one (so loopback only) with a queue of one
    and room for one request of two rows."""
    keys = tmp_path_factory.mktemp("keys")
    (keys / "api").write_text(f"# users\n{USER}\n{OTHER}\n")
    (keys / "admin").write_text(f"{ADMIN}\n")
    main = Server("--model", tiny_dir, "--adapters", str(adapter_dir), "--api-key-file", str(keys / "api"),
                  "--admin-key-file", str(keys / "admin"), "--max-body-bytes", "100000",
                  "--max-upload-bytes", "50000")
    small = Server("--model", tiny_dir, "--adapters", str(tmp_path_factory.mktemp("none")), "--limit", "max_queue=1",
                   "--limit", "max_batch_rows=2", "--grace-seconds", "60")
    yield main, small
    main.stop()
    small.stop()


@pytest.fixture(scope="module")
def server(servers):
    return servers[0].wait()


@pytest.fixture
def user(server):
    with server.client(USER) as c:
        yield c


def _png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _same_image(png: Image.Image, expected: Image.Image):
    """Equal to the engine's own image, up to one uint8 step (batched rows equal solo runs to
    1e-4, which can flip a rounding)."""
    a, b = np.asarray(png.convert("RGB"), dtype=int), np.asarray(expected, dtype=int)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1


def _error(r, status, type_=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    if type_:
        assert body["error"]["type"] == type_, body
    return body["error"]["message"]


def _wait(cond, seconds=30.0):
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


# ---------------------------------------------------------------------------------- basics
def test_health_ready_openapi_and_the_page_need_no_key(server):
    with server.client() as c:
        assert c.get("/health").json() == {"status": "ok"}
        assert c.get("/ready").json()["status"] == "ready"
        paths = c.get("/openapi.json").json()["paths"]
        for p in ("/v1/images/generations", "/sdapi/v1/txt2img", "/v1/jobs", "/v1/jobs/{job_id}/events",
                  "/v1/adapters", "/sdapi/v1/progress"):
            assert p in paths
        assert c.get("/docs").status_code == 200
        assert "<title>impasto</title>" in c.get("/").text


@pytest.mark.parametrize("method, path", [
    ("POST", "/v1/images/generations"), ("POST", "/sdapi/v1/txt2img"), ("POST", "/v1/jobs"),
    ("GET", "/v1/adapters"), ("GET", "/sdapi/v1/loras"), ("GET", "/sdapi/v1/progress"), ("GET", "/metrics"),
])
def test_401_without_a_key_and_with_a_wrong_one(server, method, path):
    for key in (None, "wrong-key-0123456789abcdef"):
        with server.client(key) as c:
            r = c.request(method, path, json={"prompt": "a star"})
            _error(r, 401, "authentication_error")
            assert r.headers["www-authenticate"] == "Bearer"


def test_adapter_management_needs_the_admin_key(server, user):
    _error(user.delete("/v1/adapters/l0"), 403, "permission_error")
    _error(user.post("/v1/adapters", files={"file": ("x.safetensors", b"x")}), 403)
    # refused before the body is read: the size limit is not what answers
    _error(user.post("/v1/adapters", files={"file": ("x.safetensors", b"\0" * 60_000)}), 403)
    with server.client() as anonymous:
        _error(anonymous.delete("/v1/adapters/l0"), 401)
        _error(anonymous.post("/v1/adapters", files={"file": ("x.safetensors", b"x")}), 401, "authentication_error")


# ---------------------------------------------------------------------------------- images
def test_openai_images_equal_engine_generate(user, ref):
    body = {"prompt": "a red star", "n": 2, "seed": 5, "num_inference_steps": 3, "guidance_scale": 6.0,
            "negative_prompt": "blurry", "adapters": [{"name": "l0", "scale": 0.7}], "size": "32x32"}
    r = user.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["seed"] for d in data] == [5, 6]  # image i uses seed + i
    for i, d in enumerate(data):
        want = ref.generate("a red star", adapters=[("l0", 0.7)], guidance=6.0, negative_prompt="blurry",
                            steps=3, seed=5 + i, height=32, width=32).images[0]
        png = _png(d["b64_json"])
        _same_image(png, want)
        assert png.info["parameters"] == ("a red star <lora:l0:0.7>\nNegative prompt: blurry\n"
                                          f"Steps: 3, Sampler: DDIM, CFG scale: 6, Seed: {5 + i}, Size: 32x32, "
                                          f"Model: {os.path.basename(ref.base.path)}")


def test_openai_loras_alias_and_styles(user, ref):
    body = {"prompt": "a blue square", "seed": 9, "num_inference_steps": 2, "loras": [{"name": "l3"}],
            "styles": [{"name": "wc", "weight": 2.0}]}
    r = user.post("/v1/images/generations", json=body)
    assert r.status_code == 200, r.text
    want = ref.generate("a blue square", adapters=[("l3", 1.0)], steps=2, seed=9,
                        guidance=impasto.Guidance(cfg=7.5, styles={"wc": 2.0})).images[0]
    png = _png(r.json()["data"][0]["b64_json"])
    _same_image(png, want)
    assert 'Style guidance: "wc: 2"' in png.info["parameters"]


def test_a1111_txt2img_parses_loras_per_image_and_uses_seed_plus_i(user, ref):
    prompts = ["a star <lora:l1:0.5>", "a square <lora:l2:1.2> <lora:l4:0.3>"]
    body = {"prompt": prompts, "negative_prompt": "", "seed": 11, "steps": 3, "cfg_scale": 5, "batch_size": 2,
            "sampler_name": "DDIM", "override_settings": {"ignored": True}}
    r = user.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert set(out) == {"images", "parameters", "info"}
    info = json.loads(out["info"])
    assert info["all_seeds"] == [11, 12] and info["all_prompts"] == prompts
    assert out["parameters"]["prompt"] == prompts
    expected = [("a star", [("l1", 0.5)]), ("a square", [("l2", 1.2), ("l4", 0.3)])]
    for i, (b64, (prompt, adapters)) in enumerate(zip(out["images"], expected)):
        want = ref.generate(prompt, adapters=adapters, guidance=5.0, steps=3, seed=11 + i).images[0]
        png = _png(b64)
        _same_image(png, want)
        assert png.info["parameters"] == info["infotexts"][i]
        assert png.info["parameters"].startswith(f"{prompt} {' '.join(f'<lora:{n}:{s:g}>' for n, s in adapters)}")


def test_a1111_reads(user, ref):
    loras = user.get("/sdapi/v1/loras").json()
    assert {entry["name"] for entry in loras} == {f"l{i}" for i in range(8)}
    assert all(set(entry) >= {"name", "alias", "path", "metadata"} for entry in loras)
    (model,) = user.get("/sdapi/v1/sd-models").json()
    assert model["model_name"] == os.path.basename(ref.base.path)
    samplers = [s["name"] for s in user.get("/sdapi/v1/samplers").json()]
    assert samplers[0] == "DDIM" and "Euler a" in samplers  # the model's own first, then the table's
    assert user.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == model["title"]


@pytest.mark.parametrize("path, body, type_, match", [
    ("/v1/images/generations", {"adapters": [{"name": "l0", "start": 0.5}]}, "not_supported", "step-scheduled"),
    ("/v1/images/generations", {"image": "aGVsbG8="}, "not_supported", "encoder"),
    ("/v1/images/generations", {"response_format": "url"}, "not_supported", "b64_json"),
    ("/v1/images/generations", {"size": "big"}, "invalid_request_error", "WIDTHxHEIGHT"),
    ("/v1/images/generations", {"n": 9}, "invalid_request_error", "max_num_images"),
    ("/v1/images/generations", {"num_inference_steps": 500}, "invalid_request_error", "steps"),
    ("/v1/images/generations", {"size": "4096x4096"}, "invalid_request_error", "max_pixels"),
    ("/v1/images/generations", {"adapters": [{"name": "nope"}]}, "adapter_not_found", "nope"),
    ("/v1/images/generations", {"prompt": 3}, "invalid_request_error", "prompt"),
    ("/sdapi/v1/txt2img", {"sampler_name": "DPM fast"}, "invalid_request_error", "unknown sampler 'DPM fast'"),
    ("/sdapi/v1/txt2img", {"prompt": "x <lora:l0:1:start=0.5>"}, "not_supported", "step-scheduled"),
    ("/sdapi/v1/txt2img", {"enable_hr": True}, "not_supported", "enable_hr"),
    ("/sdapi/v1/img2img", {"init_images": ["aGVsbG8="]}, "not_supported", "img2img"),
    ("/v1/images/edits", {}, "not_supported", "img2img"),
    ("/sdapi/v1/txt2img", {"prompt": ["a", "b"], "batch_size": 3}, "invalid_request_error", "one prompt per image"),
])
def test_422_names_what_is_wrong(user, path, body, type_, match):
    message = _error(user.post(path, json={"prompt": "a star", "steps": 2, "num_inference_steps": 2, **body}), 422,
                     type_)
    assert match in message


def test_413_for_a_body_over_the_limit(user):
    _error(user.post("/v1/images/generations", json={"prompt": "x" * 200_000}), 413, "request_too_large")

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"x" * 10_000
        yield b'"}'

    r = user.post("/v1/images/generations", content=chunks(), headers={"Content-Type": "application/json"})
    _error(r, 413, "request_too_large")


def test_eight_concurrent_clients_with_different_adapters_get_their_own_images(server, ref):
    results, errors = {}, []

    def client(i):
        try:
            with server.client(USER) as c:
                r = c.post("/v1/images/generations", json={
                    "prompt": ["a red star", "a blue square", "a green heart", "a yellow circle"][i % 4],
                    "seed": 100 + i, "num_inference_steps": 3, "adapters": [{"name": f"l{i}", "scale": 0.5 + i / 8}]})
                assert r.status_code == 200, r.text
                results[i] = _png(r.json()["data"][0]["b64_json"])
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i in range(8):
        want = ref.generate(["a red star", "a blue square", "a green heart", "a yellow circle"][i % 4],
                            adapters=[(f"l{i}", 0.5 + i / 8)], steps=3, seed=100 + i).images[0]
        _same_image(results[i], want)


# ---------------------------------------------------------------------------------- jobs
def test_job_events_arrive_step_by_step_then_the_result(server, user):
    t_post = time.monotonic()
    job = user.post("/v1/jobs", json={"prompt": "a red star", "num_inference_steps": 12, "seed": 1})
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    events = []
    with user.stream("GET", f"/v1/jobs/{job_id}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[6:]), time.monotonic()))
    progress = [data for event, data, _ in events if event == "progress"]
    assert progress == [{"step": s, "total": 12} for s in range(1, 13)]
    assert [e for e, _, _ in events][-1] == "result"
    result = events[-1][1]
    assert result["state"] == "succeeded" and len(result["result"]["data"]) == 1
    # step by step: the first step was sent while the job had most of its way to go
    t_first, t_result = events[0][2], events[-1][2]
    assert t_result - t_first > 0.5 * (t_result - t_post), [round(t - t_post, 3) for _, _, t in events]
    status = user.get(f"/v1/jobs/{job_id}").json()
    assert status["state"] == "succeeded" and status["progress"] == {"step": 12, "total": 12}
    assert status["result"]["data"][0]["b64_json"] == result["result"]["data"][0]["b64_json"]
    with server.client(OTHER) as other:  # another caller's job does not exist for it
        _error(other.get(f"/v1/jobs/{job_id}"), 404, "not_found")
        _error(other.delete(f"/v1/jobs/{job_id}"), 404)


def _long_job(client, steps=200):
    r = client.post("/v1/jobs", json={"prompt": "a long one", "num_inference_steps": steps, "seed": 2})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert _wait(lambda: client.get(f"/v1/jobs/{job_id}").json()["progress"]["step"] >= 1)
    return job_id


def test_delete_cancels_a_job_at_the_next_step(user):
    job_id = _long_job(user)
    assert user.delete(f"/v1/jobs/{job_id}").status_code == 202
    assert _wait(lambda: user.get(f"/v1/jobs/{job_id}").json()["state"] == "cancelled", 10)
    status = user.get(f"/v1/jobs/{job_id}").json()
    assert status["progress"]["step"] < 200 and status["error"]["type"] == "cancelled"


def test_progress_and_interrupt_are_scoped_to_the_callers_own_jobs(server, user):
    job_id = _long_job(user)
    with server.client(OTHER) as other:
        assert other.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0
        assert other.post("/sdapi/v1/interrupt").status_code == 200
        time.sleep(0.3)
        assert user.get(f"/v1/jobs/{job_id}").json()["state"] == "running"  # not cancelled by another caller
    mine = user.get("/sdapi/v1/progress").json()
    assert mine["state"]["job_count"] == 1 and 0 < mine["progress"] < 1
    assert user.post("/sdapi/v1/interrupt").status_code == 200
    assert _wait(lambda: user.get(f"/v1/jobs/{job_id}").json()["state"] == "cancelled", 10)


def _running(client) -> float:
    text = client.get("/metrics").text
    return float(re.search(r"^impasto_running_requests (\S+)$", text, re.M).group(1))


def test_a_client_that_disconnects_cancels_its_sync_request_never_a_job(server, user):
    with server.client(USER, timeout=1.0) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            impatient.post("/sdapi/v1/txt2img", json={"prompt": "slow", "steps": 200, "seed": 1})
    assert _wait(lambda: _running(user) == 0, 10)  # 200 steps take ~10 s: it was cancelled
    # a job outlives the connection that created it and one that listened to its events
    r = user.post("/v1/jobs", json={"prompt": "a job", "num_inference_steps": 15, "seed": 4})
    job_id = r.json()["id"]
    with user.stream("GET", f"/v1/jobs/{job_id}/events") as events:
        next(events.iter_lines())  # the first event, then hang up
    assert _wait(lambda: user.get(f"/v1/jobs/{job_id}").json()["state"] == "succeeded", 30)


# ---------------------------------------------------------------------------------- adapters
def test_upload_register_use_and_delete_an_adapter(server, user, adapter_dir, ref, tmp_path):
    with server.client(ADMIN) as admin:
        blob = open(_lora(tmp_path / "up.safetensors", 77), "rb").read()
        r = admin.post("/v1/adapters", files={"file": ("up.safetensors", blob)}, data={"name": "uploaded"})
        assert r.status_code == 201, r.text
        assert r.json()["family"] == "lora" and r.json()["rank"] == 4
        assert (adapter_dir / "uploaded.safetensors").read_bytes() == blob
        assert "uploaded" in {a["name"] for a in user.get("/v1/adapters").json()["data"]}
        assert "uploaded" in {a["name"] for a in user.get("/sdapi/v1/loras").json()}
        r = user.post("/v1/images/generations", json={"prompt": "up", "seed": 3, "num_inference_steps": 2,
                                                      "adapters": [{"name": "uploaded", "scale": 0.9}]})
        assert r.status_code == 200, r.text
        ref.adapters.register("uploaded", tmp_path / "up.safetensors")
        try:
            want = ref.generate("up", adapters=[("uploaded", 0.9)], steps=2, seed=3).images[0]
        finally:
            ref.adapters.unregister("uploaded")
        _same_image(_png(r.json()["data"][0]["b64_json"]), want)
        _error(admin.post("/v1/adapters", files={"file": ("up.safetensors", blob)}, data={"name": "uploaded"}), 409)

        before = sorted(os.listdir(adapter_dir))
        message = _error(admin.post("/v1/adapters", files={"file": ("bad.safetensors", b"\x08" + b"\0" * 200)}), 422)
        assert "bad.safetensors" in message
        _error(admin.post("/v1/adapters", files={"file": ("big.safetensors", b"\0" * 60_000)}), 413)
        _error(admin.post("/v1/adapters", files={"file": ("x.bin", blob)}), 422)
        assert sorted(os.listdir(adapter_dir)) == before  # refused files are gone, no temporary left

        assert admin.delete("/v1/adapters/uploaded").json() == {"deleted": "uploaded"}
        assert not (adapter_dir / "uploaded.safetensors").exists()
        _error(admin.delete("/v1/adapters/uploaded"), 404, "not_found")
        _error(user.post("/v1/images/generations", json={"prompt": "up", "num_inference_steps": 2,
                                                         "adapters": [{"name": "uploaded"}]}), 422)


def test_metrics(user):
    user.get("/v1/adapters")
    text = user.get("/metrics").text
    assert re.search(r'^impasto_http_requests_total\{endpoint="/v1/images/generations",status="200"\} [1-9]', text, re.M)
    assert re.search(r'^impasto_http_requests_total\{endpoint="/v1/images/generations",status="422"\} [1-9]', text, re.M)
    assert 'impasto_http_request_seconds_bucket{endpoint="/sdapi/v1/txt2img",le="0.5"}' in text
    for name in ("impasto_queue_depth", "impasto_active_rows", "impasto_unet_forwards_total",
                 "impasto_adapter_cache_hits_total", "impasto_adapter_cache_misses_total",
                 "impasto_adapter_cache_loads_total", "impasto_adapter_cache_load_seconds_total"):
        assert re.search(rf"^{name} \S+$", text, re.M), name
    assert float(re.search(r"^impasto_adapter_cache_loads_total (\S+)$", text, re.M).group(1)) >= 8


# ---------------------------------------------------------------------------------- a keyless, small server
@pytest.fixture(scope="module")
def small(servers):
    return servers[1].wait()


def test_keyless_server_says_it_serves_loopback_only(small):
    assert "loopback only" in small.log and small.url.startswith("http://127.0.0.1:")


def test_full_queue_is_429_with_retry_after(small):
    with small.client() as c:
        running = _long_job(c)  # two rows: the batch is full
        queued = c.post("/v1/jobs", json={"prompt": "waits", "num_inference_steps": 2})
        assert queued.status_code == 202
        r = c.post("/v1/images/generations", json={"prompt": "too many", "num_inference_steps": 2})
        _error(r, 429, "rate_limit_exceeded")
        assert int(r.headers["retry-after"]) >= 1
        for job_id in (running, queued.json()["id"]):
            c.delete(f"/v1/jobs/{job_id}")
        assert _wait(lambda: _running(c) == 0 and c.get(f"/v1/jobs/{queued.json()['id']}").json()["state"] != "queued")


def _refused(server) -> bool:
    try:
        with server.client() as fresh:
            fresh.get("/health")
    except httpx.ConnectError:
        return True
    return False


def test_sigterm_drains_in_flight_work_then_exits_0(small):
    results = {}

    def sync():
        with small.client() as c:
            results["sync"] = c.post("/sdapi/v1/txt2img", json={"prompt": "sync", "steps": 20, "seed": 1})

    with small.client() as c:
        job_id = c.post("/v1/jobs", json={"prompt": "job", "num_inference_steps": 20, "seed": 2}).json()["id"]
        t = threading.Thread(target=sync)
        t.start()
        assert _wait(lambda: c.get(f"/v1/jobs/{job_id}").json()["progress"]["step"] >= 1)
        assert _wait(lambda: c.get("/sdapi/v1/progress").json()["state"]["job_count"] == 2)  # both in flight
        small.proc.send_signal(signal.SIGTERM)
        assert _wait(lambda: c.get("/ready").status_code == 503, 5)  # the open connection sees it stopping
    assert _wait(lambda: _refused(small), 5)  # no new connections
    t.join(60)
    assert results["sync"].status_code == 200 and len(results["sync"].json()["images"]) == 1
    assert small.proc.wait(60) == 0
    assert small.log.rstrip().endswith("impasto serve: stopped")


# ---------------------------------------------------------------------------------- the page
def _chromium():
    exe, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (exe and driver):
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium and chromium-driver (.ci/run)")
        pytest.skip("chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = exe
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1000,1200"):
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def test_the_page_makes_an_image_with_an_adapter_and_shows_progress(server, ref):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _chromium()
    try:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "key").send_keys(USER)
        browser.find_element(By.ID, "connect").click()
        box = WebDriverWait(browser, 30).until(lambda b: b.find_element(By.CSS_SELECTOR, 'input[value="l5"]'))
        box.click()
        scale = browser.find_element(By.CSS_SELECTOR, 'input[data-scale-of="l5"]')
        scale.clear()
        scale.send_keys("0.8")
        for field, value in (("prompt", "a green heart"), ("seed", "21"), ("steps", "10")):
            element = browser.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        browser.find_element(By.ID, "generate").click()
        img = WebDriverWait(browser, 60).until(lambda b: b.find_element(By.CSS_SELECTOR, "#gallery img.result"))
        status = browser.find_element(By.ID, "status")
        assert int(status.get_attribute("data-events")) == 10  # one progress event per step reached the page
        assert status.text == "done: step 10/10"
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == 32
        png = _png(img.get_attribute("src").split(",", 1)[1])
        want = ref.generate("a green heart", adapters=[("l5", 0.8)], steps=10, seed=21).images[0]
        _same_image(png, want)
        artifacts = os.path.join(ROOT, "build", "test-artifacts")
        os.makedirs(artifacts, exist_ok=True)
        browser.save_screenshot(os.path.join(artifacts, "serve-page.png"))
    finally:
        browser.quit()
