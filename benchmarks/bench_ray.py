"""impasto on Ray Serve: adapter-affinity routing (multiplexed ids) vs Ray's default routing.

    cd /tmp && /work/main/.venv/bin/python /work/main/benchmarks/bench_ray.py \
        [--requests 200] [--library 200] [--clients 4] [--replicas 2] [--cache 40] [--steps 2]

A local Ray cluster (2 CPUs, no dashboard); the shipped miniature model, 32x32 px, DDIM, cfg
7.5, float32, CPU, one torch thread per replica. Library: `--library` rank-4 attention LoRAs
(random, seeded). Each replica's host cache holds `--cache` of them (host_cache_bytes) and its
multiplexed LRU as many ids. Load, the same list for both sides: `--requests` requests, one
LoRA each drawn Zipf(1.1) over the library (seeded), `--clients` closed-loop HTTP clients
through Ray's proxy. Sides, one after the other in one run, each a fresh app:
  (a) affinity: the ingress sends the adapter as multiplexed_model_id (impasto.serve.ray)
  (b) default:  no multiplexed id, Ray's default (power-of-two-choices) routing
Per side: adapter file loads per 100 requests (the replicas' store counters), host-cache hit
rate, throughput, p50/p99 latency (send to response). On a 2-core machine this is a
functional comparison; `--arithmetic` (always printed) scales the measured miss behaviour to 8
GPU replicas and 10,000 adapters by simulating the same two routings over per-replica LRUs and
pricing each load with the measured cold-swap times in benchmarks/RESULTS.md (bench_store).
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import socket
import sys
import tempfile
import threading
import time

import numpy as np

# cold swap p50 in ms, SD 1.5 shapes, idle CPU machine (RESULTS.md, bench_store (a) at the size)
COLD_SWAP_MS = {"rank1 (0.11 MB)": 0.67, "kv (5 MB)": 11.38, "lora rank 8-16 (10 MB)": 33.94}


def zipf_draws(n: int, library: int, s: float, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, library + 1) ** s
    return list(rng.choice(library, size=n, p=p / p.sum()))


Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def write_library(folder: str, n: int, width: int) -> list[str]:
    import safetensors.torch
    import torch

    q = Q
    names = []
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        safetensors.torch.save_file({f"unet.{q}.lora_A.weight": torch.randn(4, width, generator=g) * 0.1,
                                     f"unet.{q}.lora_B.weight": torch.randn(width, 4, generator=g) * 0.1},
                                    os.path.join(folder, f"l{i:03d}.safetensors"))
        names.append(f"l{i:03d}")
    return names


def run_side(args, port: int, folder: str, names: list, draws: list, affinity: bool, host_bytes: int) -> dict:
    import httpx
    import ray
    from ray import serve

    from impasto.serve.ray import build
    from impasto.serve.ray.directory import NAMESPACE

    app = "bench-affinity" if affinity else "bench-default"
    serve.run(build("tiny", folder, replicas=args.replicas, name=app, affinity=affinity,
                    max_models_per_replica=args.cache, directory=f"{app}-directory", engine_kwargs={"device": "cpu", "host_cache_bytes": host_bytes}),
              name=app, route_prefix="/")
    directory = ray.get_actor(f"{app}-directory", namespace=NAMESPACE)

    def totals():
        state = ray.get(directory.state.remote(), timeout=30)
        out = collections.Counter()
        for r in state.values():
            out.update({k: r["stats"]["adapter_cache"].get(k, 0) for k in ("loads", "hits", "misses")})
        out["replicas"] = len(state)
        return out

    while totals()["replicas"] < args.replicas:
        time.sleep(0.2)
    before = totals()
    todo = collections.deque(enumerate(draws))
    lat, failed, lock = [], [0], threading.Lock()

    def client():
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300) as c:
            while True:
                with lock:
                    if not todo:
                        return
                    i, k = todo.popleft()
                body = {"prompt": "a red star", "seed": i, "num_inference_steps": args.steps, "size": "32x32",
                        "adapters": [{"name": names[k]}]}
                t0 = time.perf_counter()
                r = c.post("/v1/images/generations", json=body)
                with lock:
                    if r.status_code == 200:
                        lat.append(time.perf_counter() - t0)
                    else:
                        failed[0] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    time.sleep(1.0)  # the replicas' next report to the directory
    after = totals()
    serve.delete(app)
    loads = after["loads"] - before["loads"]
    hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
    return {"side": "affinity (multiplexed id)" if affinity else "Ray default routing", "done": len(lat),
            "failed": failed[0], "loads_per_100": 100 * loads / max(len(lat), 1),
            "hit_rate": hits / max(hits + misses, 1), "throughput": len(lat) / wall,
            "p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)), "wall": wall}


def simulate(replicas: int, library: int, cache: int, n: int, s: float, seed: int, affinity: bool) -> float:
    """Miss rate of per-replica LRUs of `cache` adapters under Zipf(s) requests: affinity sends an
    adapter to the replica that holds it, else to the replica with the fewest held ids (Ray's
    multiplex rule); default sends each request to a random replica."""
    rng = random.Random(seed)
    lrus = [collections.OrderedDict() for _ in range(replicas)]
    misses = 0
    for k in zipf_draws(n, library, s, seed):
        if affinity:
            holders = [i for i, lru in enumerate(lrus) if k in lru]
            r = holders[0] if holders else min(range(replicas), key=lambda i: (len(lrus[i]), rng.random()))
        else:
            r = rng.randrange(replicas)
        lru = lrus[r]
        if k in lru:
            lru.move_to_end(k)
            continue
        misses += 1
        lru[k] = True
        if len(lru) > cache:
            lru.popitem(last=False)
    return misses / n


def arithmetic(rate_per_replica: float = 2.0) -> str:
    """8 GPU replicas, 10,000 adapters, Zipf(1.1): loads per second under each routing."""
    lines = ["| per-replica cache | routing | miss rate | loads/s at 8 x "
             f"{rate_per_replica:g} img/s | " + " | ".join(f"load s/s, {k}" for k in COLD_SWAP_MS) + " |",
             "|---|---|---|---|" + "---|" * len(COLD_SWAP_MS)]
    for cache in (250, 1000):
        for affinity in (True, False):
            miss = simulate(8, 10_000, cache, 200_000, 1.1, 0, affinity)
            loads = miss * 8 * rate_per_replica
            cost = " | ".join(f"{loads * ms / 1000:.3f}" for ms in COLD_SWAP_MS.values())
            lines.append(f"| {cache} | {'affinity' if affinity else 'default'} | {miss:.3f} | {loads:.2f} | {cost} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--library", type=int, default=200)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--cache", type=int, default=40, help="adapters per replica (host cache and multiplexed LRU)")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--default-first", action="store_true", help="run side (b) first (order effects on a busy machine)")
    p.add_argument("--arithmetic-only", action="store_true")
    args = p.parse_args(argv)
    print("## 8 GPU replicas, 10,000 adapters, Zipf(1.1) (simulated LRUs, measured cold swaps)\n")
    print(arithmetic(), flush=True)
    if args.arithmetic_only:
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray
    from ray import serve

    import impasto

    folder = tempfile.mkdtemp(prefix="bench-ray-")
    probe = impasto.Engine.from_pretrained("tiny", device="cpu")
    names = write_library(folder, args.library, probe.base.unet.get_submodule(Q).in_features)
    host_bytes = args.cache * probe.adapters.register(names[0], os.path.join(folder, f"{names[0]}.safetensors")).nbytes
    probe.close()
    draws = zipf_draws(args.requests, args.library, 1.1, 0)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    order = (False, True) if args.default_first else (True, False)
    rows = {affinity: run_side(args, port, folder, names, draws, affinity, host_bytes) for affinity in order}
    rows = [rows[True], rows[False]]
    serve.shutdown()
    ray.shutdown()
    print(f"\n## measured: {args.replicas} replicas, {args.library} adapters, {args.requests} requests Zipf(1.1), "
          f"{args.clients} clients, cache {args.cache}/replica, {args.steps} steps, {len(set(draws))} distinct\n")
    print("| routing | done | failed | adapter loads / 100 req | host-cache hit rate | img/s | p50 s | p99 s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['side']} | {r['done']} | {r['failed']} | {r['loads_per_100']:.1f} | {r['hit_rate']:.3f} | "
              f"{r['throughput']:.2f} | {r['p50']:.2f} | {r['p99']:.2f} |")
    a, d = rows
    print(f"\ndefault / affinity: loads {d['loads_per_100'] / max(a['loads_per_100'], 1e-9):.2f}x, "
          f"throughput {a['throughput'] / d['throughput']:.2f}x (affinity / default)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
