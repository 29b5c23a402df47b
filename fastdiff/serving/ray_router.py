"""Ray Serve's request router for fastdiff's replicas: least outstanding requests, counted when routed.

Ray's default router (power of two choices) compares replicas by a queue-length cache that it raises only once
a routed request has been sent, while its routing tasks assign a whole burst of pending requests before any of
them is sent; a burst therefore lands on whichever replica looked shorter when it began (24 requests to two
replicas split 19/5 or 16/8). :class:`LeastOutstandingRouter` counts a request against its replica the moment
it routes it and releases it when the request finishes (or is cancelled before it is sent), so each request goes
to the replica this router has the fewest requests in flight on (ties broken at random), and a burst spreads
evenly. The counts are this router's own (one per proxy or handle); each replica's ``max_ongoing_requests``
still bounds what it holds (a full replica rejects and the router tries the next one).

This module imports Ray alone: Ray pickles a custom router's module by value into each proxy, which then needs
neither fastdiff nor torch.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

from ray.serve.request_router import LocalityMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica


class LeastOutstandingRouter(LocalityMixin, RequestRouter):
    """Routes each request to the replica with the fewest requests this router has routed there and not yet seen
    finish, preferring replicas on this node first (as Ray's default router does); ties are broken at random.

    Every request routed is counted against the replica chosen for it, from the moment it is chosen (so requests
    routed in one burst see each other) until Ray reports it finished, or its routing was cancelled before it was
    sent. Replicas come in the order of their counts, so a replica whose ``max_ongoing_requests`` is reached is
    passed over for the next."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # internal request id -> (replica it is counted against, the routing future it was counted for)
        self._routed: dict[str, tuple[ReplicaID, asyncio.Future]] = {}
        self._outstanding: Counter[ReplicaID] = Counter()

    def outstanding(self, replica_id: ReplicaID) -> int:
        """How many requests this router has routed to ``replica_id`` that have not finished."""
        return self._outstanding[replica_id]

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        """The candidates (this node's first, see :meth:`apply_locality_routing`), one per rank, fewest
        outstanding requests first; the request is counted against the first."""
        allowed = self.apply_locality_routing(pending_request)
        replicas = [r for r in candidate_replicas if r.replica_id in allowed]
        if not replicas:
            return []
        random.shuffle(replicas)  # the sort is stable: ties in random order
        replicas.sort(key=lambda r: self._outstanding[r.replica_id])
        if pending_request is not None:
            self._count(pending_request, replicas[0].replica_id)
        return [[r] for r in replicas]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: object) -> None:
        """The request went to ``replica_id`` (not necessarily the first choice, if that one was full)."""
        if pending_request.metadata.internal_request_id in self._routed:  # not if it already finished
            self._count(pending_request, replica_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        """A request to ``replica_id`` finished (answered, failed, or rejected by a full replica)."""
        routed = self._routed.get(internal_request_id)
        if routed is not None and routed[0] == replica_id:
            self._release(internal_request_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        """Drops the replica from routing and forgets what was counted against it."""
        super().on_replica_actor_died(replica_id)
        self._forget_replicas_except(set(self.curr_replicas))

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """Takes the new replica set and forgets counts on replicas that left it."""
        super().update_replicas(replicas)
        self._forget_replicas_except({r.replica_id for r in replicas})

    # ------------------------------------------------------------------ counts
    def _count(self, pending_request: PendingRequest, replica_id: ReplicaID) -> None:
        request_id = pending_request.metadata.internal_request_id
        future = pending_request.future  # a retry routes again with a new future
        routed = self._routed.get(request_id)
        if routed is not None:
            if routed[0] == replica_id and routed[1] is future:
                return
            self._decrement(routed[0])
        self._routed[request_id] = (replica_id, future)
        self._outstanding[replica_id] += 1
        if routed is None or routed[1] is not future:
            future.add_done_callback(lambda f, rid=request_id: self._on_routing_done(rid, f))

    def _on_routing_done(self, request_id: str, future: asyncio.Future) -> None:
        routed = self._routed.get(request_id)
        if future.cancelled() and routed is not None and routed[1] is future:  # never sent: nothing will finish
            self._release(request_id)

    def _release(self, request_id: str) -> None:
        replica_id, _ = self._routed.pop(request_id)
        self._decrement(replica_id)

    def _decrement(self, replica_id: ReplicaID) -> None:
        self._outstanding[replica_id] -= 1
        if self._outstanding[replica_id] <= 0:
            del self._outstanding[replica_id]

    def _forget_replicas_except(self, live: set[ReplicaID]) -> None:
        for request_id, (replica_id, _) in list(self._routed.items()):
            if replica_id not in live:
                del self._routed[request_id]
        for replica_id in list(self._outstanding):
            if replica_id not in live:
                del self._outstanding[replica_id]


__all__ = ["LeastOutstandingRouter"]
