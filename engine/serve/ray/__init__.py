"""impasto on Ray Serve: replicas that each own one Engine, routed by adapter affinity.

    pip install 'impasto[ray]'
    impasto serve --ray --replicas 2 --adapters /shared/loras     # a local cluster, or RAY_ADDRESS's
    serve run impasto.serve.ray:app adapters=/shared/loras replicas=2

The ingress (one replica, no engine) serves create_app's endpoints, the same as `impasto
serve`, over a RayBackend; it calls the `Replica` deployment with the request's routing key as
Ray's multiplexed model id (routing.py), so requests naming an adapter reach a replica that
already holds it, and each replica batches whatever reaches it step by step. Adapter files
live on a path every node sees (the adapter root); registrations reach every replica through
the directory actor (directory.py).
"""

from __future__ import annotations

__all__ = ["app", "build"]

REPLICA_CPUS = 0.5  # Ray reserves 1 CPU per replica by default: 2 replicas + ingress would not fit 2 CPUs
INGRESS_CPUS = 0.25


def build(model: str = "tiny", adapters: str | None = None, *, replicas: int = 2, name: str = "impasto",
          max_models_per_replica: int = 64, spread_above: int = 8, affinity: bool = True,
          replica_cpus: float = REPLICA_CPUS, ingress_cpus: float = INGRESS_CPUS, threads: int | None = None,
          engine_kwargs: dict | None = None, settings: dict | None = None, warm_up: bool = True,
          directory: str | None = None, ingress_replicas: int = 1):
    """Semantics: the Ray Serve Application (ingress bound to `replicas` Replicas) for `model`
    and the adapter root `adapters`. engine_kwargs: Engine.from_pretrained keywords (device,
    host_cache_bytes, limits such as max_queue); settings: serve.app.Settings fields (api_keys,
    admin_keys, ...; adapter_root is `adapters`). affinity=False routes by Ray's default
    (no multiplexed id), for comparison. directory: the name of the app's registration log
    actor (directory.py; default: unique per build). ingress_replicas: HTTP ingress replicas
    (jobs are held by the engine replicas, so any ingress answers for any job)."""
    import os
    import secrets

    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from ...engine import LIMITS
    from .backend import Ingress
    from .replica import Replica

    if adapters is None or not os.path.isdir(adapters):
        raise ValueError(f"adapters: {adapters!r} is not a folder (the adapter root every replica reads)")
    if replicas < 1 or ingress_replicas < 1:
        raise ValueError(f"replicas, ingress_replicas: expected >= 1, got {replicas}, {ingress_replicas}")
    engine_kwargs = dict(engine_kwargs or {})
    limits = {**LIMITS, **{k: v for k, v in engine_kwargs.items() if k in LIMITS}}
    # Nothing here talks to Ray: `serve run` calls this builder before it connects.
    directory = directory or f"impasto-directory-{name}-{secrets.token_hex(4)}"
    # Every streaming request is "ongoing" for its whole run: below max_queue + rows Ray would
    # hold back requests the engine could batch (the default, 5, starves step-level batching).
    ongoing = limits["max_queue"] + limits["max_batch_rows"]
    # Kept jobs' follow/cancel calls are "ongoing" too; JobRouter sends them to the replica named.
    replica = serve.deployment(Replica, name="Replica", num_replicas=replicas, max_ongoing_requests=2 * ongoing,
                               ray_actor_options={"num_cpus": replica_cpus},
                               request_router_config=RequestRouterConfig(
                                   request_router_class="impasto.serve.ray.router:JobRouter"))
    ingress = serve.deployment(Ingress, name="Ingress", num_replicas=ingress_replicas,
                               max_ongoing_requests=2 * ongoing * replicas, ray_actor_options={"num_cpus": ingress_cpus})
    threads = threads or max(1, int(replica_cpus))
    settings = {**(settings or {}), "adapter_root": adapters}
    return ingress.bind(replica.bind(model, adapters, engine_kwargs, directory, max_models_per_replica, threads,
                                     warm_up),
                        directory, settings, replicas, spread_above, affinity)


def app(args: dict):
    """`serve run impasto.serve.ray:app adapters=DIR [model=tiny replicas=2 max_models_per_replica=64
    spread_above=8 ingress_replicas=1]`: the application builder Ray's CLI calls with the key=value arguments."""
    args = dict(args)
    ints = {k: int(args.pop(k)) for k in ("replicas", "max_models_per_replica", "spread_above", "ingress_replicas")
            if k in args}
    return build(args.pop("model", "tiny"), args.pop("adapters", None), **ints)
