"""LeastOutstandingRouter's counts, without a Ray instance: a burst routed before any request is sent spreads
evenly, and each request's count is released exactly once (finished, cancelled before it was sent, or its replica
gone). Ray's request metadata and ids come from ``ray.serve._private`` (what Ray's router hands a custom router)."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("ray.serve")

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID, RequestMetadata  # noqa: E402
from ray.serve.request_router import PendingRequest  # noqa: E402

from fastdiff.serving.ray_router import LeastOutstandingRouter  # noqa: E402

pytestmark = pytest.mark.ray

DEPLOYMENT = DeploymentID(name="fastdiff", app_name="fastdiff")


class FakeReplica:
    """What the router reads of a running replica."""

    def __init__(self, name: str):
        self.replica_id = ReplicaID(name, DEPLOYMENT)
        self.node_id = "node"
        self.availability_zone = None
        self.multiplexed_model_ids: set = set()
        self.max_ongoing_requests = 100
        self.is_cross_language = False

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return 0


def _pending(i: int) -> PendingRequest:
    return PendingRequest(args=[], kwargs={}, metadata=RequestMetadata(request_id=str(i), internal_request_id=str(i)))


def _run(test):
    async def body():
        router = LeastOutstandingRouter(deployment_id=DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN)
        router.initialize_state()
        a, b = FakeReplica("a"), FakeReplica("b")
        router.update_replicas([a, b])
        await test(router, a, b)

    asyncio.run(body())


async def _route(router, replicas, requests):
    return [(await router.choose_replicas(replicas, pr))[0][0] for pr in requests]


def test_a_burst_routed_before_any_request_is_sent_spreads_evenly():
    async def test(router, a, b):
        requests = [_pending(i) for i in range(24)]
        first = await _route(router, [a, b], requests)
        assert [first.count(a), first.count(b)] == [12, 12]
        assert router.outstanding(a.replica_id) == router.outstanding(b.replica_id) == 12
        ranks = await router.choose_replicas([a, b], _pending(99))
        assert [len(rank) for rank in ranks] == [1, 1]  # every replica, one per rank: a full one is passed over

    _run(test)


def test_each_request_is_released_once():
    async def test(router, a, b):
        requests = [_pending(i) for i in range(4)]
        first = await _route(router, [a, b], requests)
        router.on_request_completed(first[0].replica_id, "0")
        router.on_request_completed(first[0].replica_id, "0")  # a second report changes nothing
        other = b if first[1] is a else a
        router.on_request_routed(requests[1], other.replica_id, None)  # its first choice was full
        router.on_request_completed(first[1].replica_id, "1")  # so this report is not about it
        assert router.outstanding(other.replica_id) + router.outstanding(first[1].replica_id) == 3
        requests[2].future.cancel()  # routing cancelled before it was sent: nothing will report it
        await asyncio.sleep(0)
        assert router.outstanding(a.replica_id) + router.outstanding(b.replica_id) == 2
        requests[3].future.set_result(first[3])  # sent: it stays counted until it finishes
        await asyncio.sleep(0)
        assert router.outstanding(a.replica_id) + router.outstanding(b.replica_id) == 2
        router.on_replica_actor_died(other.replica_id)
        assert router.outstanding(other.replica_id) == 0
        assert await router.choose_replicas([r for r in (a, b) if r is not other], _pending(5))

    _run(test)
