"""`impasto serve --ray`: deploy the app on Ray Serve and serve until a signal.

Connects to the cluster at RAY_ADDRESS when set (`ray start --head` elsewhere), else starts a
local one without the dashboard. On SIGTERM or SIGINT the app is deleted (replicas drain per
Ray's graceful shutdown) and the exit status is 0.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

from ..auth import ConfigError, check_binding, read_key_file
from ..server import _limit


def run(args, *, out=sys.stdout) -> int:
    """Semantics: check the configuration, start or join Ray, deploy `build(...)` with
    `args.replicas` replicas, print the URL, block until a signal, shut Serve down, return 0."""
    check_binding(args.host, args.api_key_file)
    if args.replicas < 1:
        raise ConfigError(f"--replicas {args.replicas}: expected at least 1")
    if args.ingress_replicas < 1:
        raise ConfigError(f"--ingress-replicas {args.ingress_replicas}: expected at least 1")
    if args.port == 0:
        raise ConfigError("--port 0: Ray Serve's proxy needs a fixed port with --ray")
    settings = {"api_keys": tuple(read_key_file(args.api_key_file)) if args.api_key_file else (),
                "admin_keys": tuple(read_key_file(args.admin_key_file)) if args.admin_key_file else (),
                "grace_seconds": args.grace_seconds, "max_body_bytes": args.max_body_bytes,
                "max_upload_bytes": args.max_upload_bytes}
    limits = dict(_limit(spec) for spec in args.limit or ())
    model = args.model if args.model == "tiny" else os.path.abspath(args.model)  # replicas may start elsewhere

    import ray
    from ray import serve

    from . import build

    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"])
    else:
        ray.init(include_dashboard=False)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build(model, os.path.abspath(args.adapters), replicas=args.replicas, engine_kwargs=limits,
                    settings=settings, ingress_replicas=args.ingress_replicas), name="impasto", route_prefix="/")
    print(f"impasto serve --ray: {args.replicas} replicas, listening on http://{args.host}:{args.port}", file=out,
          flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    print("impasto serve --ray: stopped", file=out, flush=True)
    return 0
