"""The replica deployment's request router: Ray's default one (power of two choices with
multiplexed-id affinity), plus calls addressed to one replica by its id, which is how a job id
that names its replica (replica.py's kept jobs) reaches it from any ingress replica.
"""

from __future__ import annotations

from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter  # Ray's DEFAULT_REQUEST_ROUTER_PATH


class JobRouter(PowerOfTwoChoicesRequestRouter):
    """Ray's default routing, except for a call naming `replica=ID` (Replica.keep, follow,
    cancel): it goes to that replica, or, when that replica is gone, to any replica (which
    answers that it holds no such job), so a lost job is reported at once, not waited for."""

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        target = pending_request.kwargs.get("replica") if pending_request is not None else None
        if target is None:
            return await super().choose_replicas(candidate_replicas, pending_request)
        named = [r for r in candidate_replicas if r.replica_id.unique_id == target]
        return [named or list(candidate_replicas)]
