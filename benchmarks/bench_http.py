"""HTTP serving under a bounded loopback load: `impasto serve` vs `engine.submit` in-process vs a
FastAPI wrapper around a diffusers+PEFT pipeline serving one request at a time (issue 18).

    cd /tmp && /work/main/.venv/bin/python /work/main/benchmarks/bench_http.py \
        [--requests 48] [--clients 8] [--library 20] [--steps 20] [--duration 300]

Model: the shipped miniature model (engine/tiny/model/), 32x32 px, DDIM, cfg 7.5, float32, CPU.
Library: `--library` rank-8 attention LoRAs written with PEFT (bench_serving.build_library), one
folder each; the impasto server registers the folder (`--adapters`), the baseline loads every
LoRA once at start with `load_lora_weights`.

Load (the same for every side): a fixed list of `--requests` requests (prompt from the tiny
world's colours and shapes, seed = index, `--steps` steps, one LoRA drawn Zipf(1.1) over the
library, scale 1). `--clients` closed-loop clients, each sending its next request when the
previous one returned, until the list is done or `--duration` seconds passed (then the side
stops by itself and reports what finished). All traffic is to 127.0.0.1.

Sides, one after the other in one run:
  (a) http:     `impasto serve` in its own process; clients POST /v1/images/generations (httpx).
  (b) submit:   `engine.submit(...).result()` from client threads in this process (the engine
                without the HTTP layer: (a) - (b) is the server's overhead).
  (c) diffusers: a FastAPI app in its own uvicorn process (`--baseline-server`, below), one
                StableDiffusionPipeline with every LoRA loaded, a lock around
                `set_adapters([lora])` + the pipeline call: what a user would otherwise deploy.
Per side: requests done, wall time, throughput, p50/p99 latency (send to response), printed as a
markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import base64
import functools
import importlib.util
import io
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CFG = 7.5


@functools.lru_cache(maxsize=None)
def _bench_serving():
    """bench_serving.py's library builder, model lookup and percentiles (one implementation)."""
    spec = importlib.util.spec_from_file_location("bench_serving", os.path.join(HERE, "bench_serving.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_serving"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def make_requests(n: int, loras: list[str], steps: int, seed: int = 0) -> list[dict]:
    """The load: prompt, seed, steps and one Zipf(1.1)-drawn LoRA per request (rank -> LoRA
    through a fixed permutation, truncated by rejection)."""
    bs = _bench_serving()
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(loras))
    out = []
    for i in range(n):
        r = int(rng.zipf(1.1))
        while r > len(loras):
            r = int(rng.zipf(1.1))
        prompt = f"a {rng.choice(bs.COLOURS)} {rng.choice(bs.SHAPES)} on a {rng.choice(bs.COLOURS)} background"
        out.append({"prompt": prompt, "seed": i, "num_inference_steps": steps, "guidance_scale": CFG,
                    "adapters": [{"name": loras[perm[r - 1]], "scale": 1.0}]})
    return out


def closed_loop(send, requests: list[dict], clients: int, duration: float) -> dict:
    """`clients` threads each calling send(request) for the next request until none is left or
    `duration` s passed; returns done, wall seconds, latencies."""
    lock, latencies, errors = threading.Lock(), [], []
    pending = list(reversed(requests))
    t0 = time.perf_counter()

    def client():
        while time.perf_counter() - t0 < duration:
            with lock:
                if not pending:
                    return
                req = pending.pop()
            t = time.perf_counter()
            try:
                send(req)
            except Exception as e:  # noqa: BLE001 - counted, the load goes on
                errors.append(repr(e))
                continue
            with lock:
                latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"done": len(latencies), "wall": time.perf_counter() - t0, "latencies": latencies, "errors": errors}


class Process:
    """A server process started with `argv` that prints 'listening on http://...'."""

    def __init__(self, argv):
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in self.proc.stdout:
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                self.url = m.group(1)
                break
        else:
            raise SystemExit(f"{argv[:4]}: the server did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(120)


def http_sender(url: str):
    import httpx

    local = threading.local()

    def send(req):
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=600)
        r = local.client.post("/v1/images/generations", json=req)
        r.raise_for_status()
        base64.b64decode(r.json()["data"][0]["b64_json"])

    return send


def submit_sender(engine):
    import impasto

    def send(req):
        engine.submit(impasto.Request(req["prompt"], adapters=[(a["name"], a["scale"]) for a in req["adapters"]],
                                      guidance=req["guidance_scale"], steps=req["num_inference_steps"],
                                      seed=req["seed"])).result()

    return send


# ------------------------------------------------------------------------------ the baseline server
def baseline_app(model: str, library: str):
    """FastAPI around one diffusers+PEFT pipeline, one request at a time (a lock): every LoRA
    loaded once, then per request set_adapters + the pipeline call, a PNG back."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as dlog
    from fastapi import FastAPI

    dlog.set_verbosity_error()
    pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True, torch_dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for name in sorted(os.listdir(library)):
        pipe.load_lora_weights(os.path.join(library, name), weight_name="pytorch_lora_weights.safetensors",
                               adapter_name=name)
    lock = threading.Lock()
    app = FastAPI()

    @app.post("/v1/images/generations")
    def generate(body: dict):  # a plain def: FastAPI runs it in its thread pool, the lock serializes
        with lock:
            pipe.set_adapters([a["name"] for a in body["adapters"]], [a["scale"] for a in body["adapters"]])
            image = pipe(body["prompt"], num_inference_steps=body["num_inference_steps"],
                         guidance_scale=body["guidance_scale"],
                         generator=torch.Generator().manual_seed(body["seed"])).images[0]
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(buf.getvalue()).decode(),
                                                       "seed": body["seed"]}]}

    return app


def serve_baseline(model: str, library: str) -> None:
    import socket

    import uvicorn

    app = baseline_app(model, library)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    print(f"listening on http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])


# ------------------------------------------------------------------------------ main
def row(name: str, r: dict) -> str:
    bs = _bench_serving()
    lat = r["latencies"] or [float("nan")]
    return (f"| {name} | {r['done']} | {r['wall']:.1f} | {r['done'] / r['wall']:.2f} | {bs.pct(lat, 50) * 1e3:.0f} | "
            f"{bs.pct(lat, 99) * 1e3:.0f} | {len(r['errors'])} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--library", type=int, default=20)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--duration", type=float, default=300.0, help="seconds per side at most")
    p.add_argument("--model", default=None)
    p.add_argument("--sides", nargs="+", default=["http", "submit", "diffusers"])
    p.add_argument("--baseline-server", nargs=2, metavar=("MODEL", "LIBRARY"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.baseline_server:
        return serve_baseline(*args.baseline_server)

    bs = _bench_serving()
    model = bs.model_dir(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        library = os.path.join(tmp, "library")
        os.makedirs(library)
        loras, _ = bs.build_library(library, model, args.library, 0)
        requests = make_requests(args.requests, sorted(loras), args.steps)
        print(f"{args.requests} requests, {args.clients} closed-loop clients, {args.steps} steps, 32x32, "
              f"library {args.library} rank-8 LoRAs, Zipf(1.1); torch threads per process: "
              f"{os.environ.get('OMP_NUM_THREADS', 'default')}", flush=True)
        results = {}
        for side in args.sides:
            if side == "http":
                server = Process([sys.executable, "-m", "impasto.cli", "serve", "--model", model, "--adapters", library,
                                  "--port", "0"])
                try:
                    results[side] = closed_loop(http_sender(server.url), requests, args.clients, args.duration)
                finally:
                    server.stop()
            elif side == "submit":
                import impasto

                engine = impasto.Engine.from_pretrained(model, adapter_root=library)
                engine.adapters.register_dir(library)
                engine.generate("warm up", steps=1, output_type="latent")
                try:
                    results[side] = closed_loop(submit_sender(engine), requests, args.clients, args.duration)
                finally:
                    engine.close()
            elif side == "diffusers":
                server = Process([sys.executable, os.path.abspath(__file__), "--baseline-server", model, library])
                try:
                    results[side] = closed_loop(http_sender(server.url), requests, args.clients, args.duration)
                finally:
                    server.stop()
            print(row(side, results[side]), flush=True)
    print("\n| side | requests done | wall s | throughput req/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|---|---|")
    for side, r in results.items():
        print(row(side, r))
    if "http" in results and "submit" in results:
        print(f"\nHTTP / submit throughput: {results['http']['done'] / results['http']['wall'] / (results['submit']['done'] / results['submit']['wall']):.2f}")
    if "http" in results and "diffusers" in results:
        print(f"HTTP / diffusers throughput: {results['http']['done'] / results['http']['wall'] / (results['diffusers']['done'] / results['diffusers']['wall']):.2f}")


if __name__ == "__main__":
    main()
