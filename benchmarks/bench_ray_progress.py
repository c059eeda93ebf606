"""impasto on Ray Serve: how often a long job's progress reaches a polling client while other
clients submit and scrape.

    cd /tmp && /work/wt-ray/.venv/bin/python /work/wt-ray/benchmarks/bench_ray_progress.py \
        [--steps 600] [--replicas 2] [--others 6] [--other-steps 150]

A local Ray cluster (2 CPUs, no dashboard), `--replicas` replicas over the shipped miniature
model's layout (random weights, seed 0), 32x32 px, DDIM, CPU. One job of `--steps` steps
(`POST /v1/jobs`, max_steps raised to allow it); its status is polled (`GET /v1/jobs/{id}`)
every 0.1 s. Three seconds in, `--others` synchronous requests of `--other-steps` steps arrive
at once, and a scraper reads /metrics and /ready every 0.5 s. Printed: every progress gap over
1 s and the longest gap between two changes of the polled step (a gap is the time the client
saw no new step: the engine's own step time under this load, or the ingress not answering).
The code measured is the installed impasto's: run it from two virtual environments to compare
two versions.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import threading
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--others", type=int, default=6)
    p.add_argument("--other-steps", type=int, default=150)
    args = p.parse_args(argv)

    import httpx
    import ray
    from ray import serve

    from impasto.serve.ray import build
    from impasto.tiny import build_random_model

    d = tempfile.mkdtemp()
    model = build_random_model(os.path.join(d, "model"), seed=0)
    adapters = os.path.join(d, "adapters")
    os.makedirs(adapters)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve._run(build(model, adapters, replicas=args.replicas, name="progress",
                         engine_kwargs={"max_steps": max(args.steps, args.other_steps)}),
                   _blocking=False, name="progress", route_prefix="/")
        t_up = time.monotonic()
        while getattr(serve.status().applications.get("progress"), "status", None) != "RUNNING":
            if time.monotonic() - t_up > 600:
                raise SystemExit("the app did not start within 600 s")
            time.sleep(0.5)
        url = f"http://127.0.0.1:{port}"
        poll, others, scraper = (httpx.Client(base_url=url, timeout=600) for _ in range(3))
        r = poll.post("/v1/jobs", json={"prompt": "a red star", "seed": 1, "num_inference_steps": args.steps,
                                        "size": "32x32"})
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        t0 = time.monotonic()
        stop = threading.Event()

        def load():
            time.sleep(3)
            body = {"prompt": "x", "seed": 2, "num_inference_steps": args.other_steps, "size": "32x32"}
            codes = []
            threads = [threading.Thread(target=lambda: codes.append(
                others.post("/v1/images/generations", json=body).status_code)) for _ in range(args.others)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            print(f"{time.monotonic() - t0:7.2f} s  the {args.others} other requests answered: {sorted(codes)}",
                  flush=True)

        def scrape():
            while not stop.is_set():
                scraper.get("/metrics")
                scraper.get("/ready")
                time.sleep(0.5)

        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        threading.Thread(target=scrape, daemon=True).start()
        last, t_last, gaps = 0, t0, []
        while True:
            status = poll.get(f"/v1/jobs/{job}").json()
            now = time.monotonic()
            step = status["progress"]["step"]
            if step != last:
                gaps.append(now - t_last)
                if gaps[-1] > 1:
                    print(f"{now - t0:7.2f} s  step {step}: no new step for {gaps[-1]:.2f} s", flush=True)
                last, t_last = step, now
            if status["state"] not in ("queued", "running"):
                break
            time.sleep(0.1)
        stop.set()
        loader.join(600)  # the others finish before the cluster goes
        print(f"job {status['state']} after {time.monotonic() - t0:.1f} s; {len(gaps)} progress changes seen; "
              f"longest gap {max(gaps):.2f} s")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
