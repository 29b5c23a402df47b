"""The runner: the engine driven from a thread. Every batching policy gives ``Pipeline.sample``'s samples under
concurrent submissions; backpressure, deadlines, cancellation, network errors and shutdown."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch
from serving_models import gated_mixture_pipeline, mixture_pipeline, offline

from fastdiff import Pipeline, Schedule
from fastdiff.serving import (
    DeadlineExceeded,
    QueueFull,
    RequestCancelled,
    RequestFailed,
    Runner,
    SampleRequest,
    ShuttingDown,
)
from fastdiff.serving.metrics import ServingMetrics

MIXED = [("ddim", {}), ("ddpm", {}), ("dpmpp_2m", {}), ("euler_ancestral", {}), ("unipc", {}), ("ddim", {"eta": 1.0})]


def _request(i: int, n: int = 2, **kw) -> SampleRequest:
    sampler, options = MIXED[i % len(MIXED)]
    fields = dict(
        n=n,
        sample_shape=(2,),
        sampler=sampler,
        steps=3 + i % 5,
        seed=100 + i,
        options=options,
        model_kwargs={"y": torch.arange(n) % 3},
    )
    fields.update(kw)
    return SampleRequest(**fields)


@pytest.mark.parametrize("batching", ["continuous", "request", "single"])
def test_every_policy_equals_offline_sampling_under_concurrent_submissions(batching):
    pipe = mixture_pipeline()
    runner = Runner(pipe, max_batch=8, batching=batching, batch_wait_s=0.005, metrics=ServingMetrics()).start()
    reqs = [_request(i, n=1 + i % 3) for i in range(12)]
    tickets = [None] * len(reqs)

    def client(k: int) -> None:
        for i in range(k, len(reqs), 3):
            tickets[i] = runner.submit(reqs[i])
            time.sleep(0.002 * (i % 4))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for req, ticket in zip(reqs, tickets):
        assert torch.equal(ticket.future.result(30), offline(pipe, req)), (batching, req.sampler)
    runner.stop()
    text = runner.metrics.render(runner.queue_depth, runner.running_rows).decode()
    assert 'fastdiff_requests_total{outcome="ok"} 12.0' in text
    assert "fastdiff_samples_total 24.0" in text


def test_request_batching_waits_for_a_batch():
    runner = Runner(mixture_pipeline(), max_batch=8, batching="request", batch_wait_s=0.3).start()
    tickets = [runner.submit(_request(i)) for i in range(3)]
    for t in tickets:
        t.future.result(30)
    assert len({t.admitted for t in tickets}) == 1  # all three joined in one tick
    runner.stop()


def test_full_queue_refuses_with_a_retry_hint():
    pipe = gated_mixture_pipeline()
    runner = Runner(pipe, max_batch=2, max_queue=1, metrics=ServingMetrics()).start()
    pipe.model.gate.clear()
    running = runner.submit(_request(0))
    # admitted: its rows run and it no longer counts as waiting (the runner lowers the count just after admission)
    _wait_for(lambda: runner.running_rows == 2 and runner.queue_depth == 0)
    waiting = runner.submit(_request(1))
    with pytest.raises(QueueFull) as info:
        runner.submit(_request(2))
    assert info.value.retry_after >= 1
    pipe.model.gate.set()
    assert running.future.result(30) is not None and waiting.future.result(30) is not None
    runner.stop()
    assert "fastdiff_requests_rejected_total 1.0" in runner.metrics.render(0, 0).decode()


def test_deadline_and_cancel_free_their_rows():
    pipe = mixture_pipeline(delay_s=0.01)
    runner = Runner(pipe, max_batch=8).start()
    late = runner.submit(_request(0, steps=200), timeout_s=0.1)
    with pytest.raises(DeadlineExceeded):
        late.future.result(30)
    gone = runner.submit(_request(1, steps=200))
    _wait_for(lambda: runner.running_rows == 2)
    runner.cancel(gone)
    with pytest.raises(RequestCancelled):
        gone.future.result(30)
    _wait_for(lambda: runner.running_rows == 0)
    assert pipe.model.calls < 100  # neither ran its 200 steps
    ok = _request(2)
    assert torch.equal(runner.submit(ok).future.result(30), offline(pipe, ok))
    runner.stop()


def test_network_errors_and_nans_fail_their_request_and_serving_goes_on():
    pipe = mixture_pipeline()
    runner = Runner(pipe, max_batch=8).start()
    raising = runner.submit(_request(0, n=1, model_kwargs={"y": torch.tensor([77])}))
    with pytest.raises(RuntimeError, match="label 77"):
        raising.future.result(30)
    nan = runner.submit(_request(1, n=2, model_kwargs={"y": torch.tensor([0, 99])}))
    fine_req = _request(2, n=2)
    fine = runner.submit(fine_req)
    with pytest.raises(RequestFailed, match="NaN"):
        nan.future.result(30)
    assert torch.equal(fine.future.result(30), offline(pipe, fine_req))
    runner.stop()


def test_stop_drains_or_cancels():
    pipe = mixture_pipeline(delay_s=0.005)
    runner = Runner(pipe, max_batch=2).start()
    reqs = [_request(i, steps=10) for i in range(3)]
    tickets = [runner.submit(r) for r in reqs]
    runner.stop(drain=True, timeout=60)
    assert not runner.accepting
    for req, ticket in zip(reqs, tickets):
        assert torch.equal(ticket.future.result(0), offline(pipe, req))
    with pytest.raises(ShuttingDown):
        runner.submit(reqs[0])
    runner = Runner(pipe, max_batch=2).start()
    tickets = [runner.submit(_request(i, steps=100)) for i in range(3)]
    runner.stop(drain=False, timeout=60)
    for ticket in tickets:
        with pytest.raises(ShuttingDown):
            ticket.future.result(0)


def test_runner_arguments_are_checked():
    pipe = mixture_pipeline()
    with pytest.raises(ValueError, match="batching"):
        Runner(pipe, batching="eager")
    with pytest.raises(ValueError, match="max_queue"):
        Runner(pipe, max_queue=0)
    with pytest.raises(ValueError, match="max_batch"):
        Runner(pipe, max_batch=0)
    with pytest.raises(ValueError, match="unknown sampler"):
        Runner(pipe).submit(_request(0, sampler="nope"))


def _wait_for(condition, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.005)


def test_a_failing_serving_thread_fails_every_request_instead_of_hanging(monkeypatch):
    pipe = gated_mixture_pipeline()
    runner = Runner(pipe, max_batch=2).start()
    pipe.model.gate.clear()
    running = runner.submit(_request(0))
    _wait_for(lambda: runner.running_rows == 2)
    queued = runner.submit(_request(1))

    def broken(*args, **kwargs):
        raise AssertionError("a bug in the runner")

    monkeypatch.setattr(runner, "_tick", broken)
    pipe.model.gate.set()
    for ticket in (running, queued):
        with pytest.raises(RuntimeError, match="serving thread failed"):
            ticket.future.result(30)
    _wait_for(lambda: not runner.accepting)
    with pytest.raises(ShuttingDown):
        runner.submit(_request(2))


def test_bad_requests_from_concurrent_clients_fail_alone():
    pipe = mixture_pipeline()
    runner = Runner(pipe, max_batch=12).start()
    kinds = {
        "ok": lambda i, n: {"y": torch.arange(n) % 3},
        "raises": lambda i, n: {"y": torch.tensor([77] * n)},
        "nan": lambda i, n: {"y": torch.tensor([99] * n)},
        "wide": lambda i, n: {"c": torch.full((n, 1 + i % 3), 0.5)},  # widths 1-3: stacked together they fail
    }
    order = ["ok", "raises", "wide", "ok", "nan", "wide", "ok", "raises"]
    reqs = [(order[i % len(order)], _request(i, n=1 + i % 2)) for i in range(24)]
    reqs = [(kind, _request(i, n=req.n, model_kwargs=kinds[kind](i, req.n))) for i, (kind, req) in enumerate(reqs)]
    tickets = [None] * len(reqs)
    refused = []

    def client(k: int) -> None:
        for i in range(k, len(reqs), 4):
            tickets[i] = runner.submit(reqs[i][1])
        with pytest.raises(ValueError, match=r"model_kwargs\['z'\]"):  # refused at submission
            runner.submit(_request(k, model_kwargs={"z": torch.zeros(2)}))
        refused.append(k)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(refused) == [0, 1, 2, 3]
    for (kind, req), ticket in zip(reqs, tickets):
        if kind in ("ok", "wide"):
            assert torch.equal(ticket.future.result(30), offline(pipe, req)), (kind, req.sampler)
        else:
            with pytest.raises(RequestFailed, match="label 77" if kind == "raises" else "NaN"):
                ticket.future.result(30)
    runner.stop()
    assert runner.running_rows == 0 and runner.queue_depth == 0


class _RecordingFrontend:
    """A frontend whose jobs are (name, request): ``prepare`` gives the request (a job named "bad-prepare" raises),
    ``finish`` gives (name, samples) ("bad-finish" raises); every call is recorded."""

    def __init__(self):
        self.prepare_calls: list[list[str]] = []
        self.finish_calls: list[list[str]] = []

    def prepare(self, jobs):
        self.prepare_calls.append([name for name, _ in jobs])
        if any(name == "bad-prepare" for name, _ in jobs):
            raise RuntimeError("the encoder refuses this prompt")
        return [req for _, req in jobs]

    def finish(self, jobs, samples):
        self.finish_calls.append([name for name, _ in jobs])
        if any(name == "bad-finish" for name, _ in jobs):
            raise RuntimeError("the decoder refuses these latents")
        return [(name, s) for (name, _), s in zip(jobs, samples, strict=True)]


def test_a_frontend_prepares_the_jobs_of_a_pass_in_one_call_and_a_failing_job_fails_alone():
    """Jobs submitted before the serving thread wakes are prepared in one call; jobs that finish in one tick are
    finished in one call; a job whose prepare or finish raises fails alone (the others are retried apart)."""
    pipe = mixture_pipeline()
    frontend = _RecordingFrontend()
    runner = Runner(pipe, max_batch=16, frontend=frontend)
    names = ["a", "b", "bad-prepare", "c", "bad-finish"]
    reqs = [_request(0, n=1, seed=10 + i) for i in range(len(names))]  # one program: they finish in one tick
    tickets = [runner.submit(dataclasses.replace(r, model_kwargs={}), job=(name, r)) for name, r in zip(names, reqs)]
    runner.start()
    for name, req, ticket in zip(names, reqs, tickets):
        if name.startswith("bad"):
            with pytest.raises(RuntimeError, match="refuses"):
                ticket.future.result(30)
        else:
            got_name, samples = ticket.future.result(30)
            assert got_name == name and torch.equal(samples, offline(pipe, req))
    runner.stop()
    assert frontend.prepare_calls[0] == names  # one call for the whole pass, then each alone
    assert sorted(frontend.prepare_calls[1:]) == sorted([[n] for n in names])
    assert frontend.finish_calls[0] == ["a", "b", "c", "bad-finish"]
    with pytest.raises(ValueError, match="frontend"):
        Runner(pipe).submit(reqs[0], job=("a", reqs[0]))


def test_a_rare_sample_shape_is_not_starved_by_a_stream_of_common_ones():
    """Engines of different sample shapes take turns tick by tick: one request of a rare shape, queued behind
    twelve of a common one (max_batch 1, so the common ones run one after another), finishes second."""
    pipe = Pipeline(lambda x, t: 0.1 * x, Schedule.vp_discrete(), device="cpu")
    runner = Runner(pipe, max_batch=1)
    finished: list[str] = []
    tickets = [runner.submit(SampleRequest(n=1, sample_shape=(2,), steps=10, seed=i)) for i in range(12)]
    tickets.append(runner.submit(SampleRequest(n=1, sample_shape=(3,), steps=10, seed=99)))
    for name, ticket in zip([f"common {i}" for i in range(12)] + ["rare"], tickets):
        ticket.future.add_done_callback(lambda _, name=name: finished.append(name))
    runner.start()  # everything is in the inbox before the thread's first pass: the order is deterministic
    for ticket in tickets:
        ticket.future.result(30)
    runner.stop()
    assert finished[:2] == ["common 0", "rare"], finished
