"""fastdiff's step-level engine as Ray Serve replicas (``pip install fastdiff[ray]``).

Each replica loads the network and runs its own :class:`~fastdiff.serving.runner.Runner` behind the same FastAPI
app as ``fastdiff serve`` (same API, same request type, same metrics), so batching happens per step inside each
replica, not with ``@serve.batch`` around whole requests. Every response names its replica
(``X-Fastdiff-Replica``, ``X-Fastdiff-Pid``).

Routing: the proxy sends each request to the replica with the fewest requests it has routed there and not yet
seen finish (:class:`~fastdiff.serving.ray_router.LeastOutstandingRouter`), so a burst spreads across replicas
(Ray's default power-of-two-choices router, fed by a queue-length cache that lags a burst, sent 24 concurrent
requests to two replicas 19/5).

Backpressure: a replica takes at most ``max_queue + max_batch`` requests at once (``max_ongoing_requests``: what
its runner can hold running or queued, so its own 429 stays the answer for a full queue) and the proxy queues at
most ``max_queue`` more per deployment (``max_queued_requests``); beyond that Ray answers 503. No queue is
unbounded.

::

    from fastdiff.serving.ray import build_app
    from ray import serve
    serve.run(build_app("digits", num_replicas=2))       # http://127.0.0.1:8000/v1/samples
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from fastdiff.extras import missing_extra

try:
    import ray
    from fastapi import FastAPI
    from ray import serve
    from ray.serve.config import RequestRouterConfig
except ModuleNotFoundError as exc:
    raise missing_extra("ray", exc) from exc

from fastdiff.serving.ray_router import LeastOutstandingRouter
from fastdiff.serving.server import load_pipeline, make_app
from fastdiff.serving.settings import ServeSettings

DEPLOYMENT_NAME = "fastdiff"


def replica_name() -> str:
    """This replica's id in Ray Serve (its unique id where the context has one), or ``local``."""
    try:
        context = serve.get_replica_context()
    except Exception:  # noqa: BLE001  (not inside a replica)
        return "local"
    replica_id = getattr(context, "replica_id", None)
    return str(getattr(replica_id, "unique_id", None) or getattr(context, "replica_tag", "local"))


def build_app(
    model_spec: str | None = None,
    num_replicas: int = 1,
    autoscaling: dict[str, Any] | None = None,
    ray_actor_options: dict[str, Any] | None = None,
    settings: ServeSettings = ServeSettings(),
    device: str | None = None,
) -> serve.Application:
    """A Ray Serve application whose replicas each serve ``model_spec`` (as ``fastdiff serve --model``) with
    fastdiff's engine.

    Args:
        model_spec: ``digits`` (default), a ``.safetensors`` checkpoint or ``package.module:factory``; each
            replica loads it itself.
        num_replicas: fixed replica count (ignored with ``autoscaling``).
        autoscaling: a Ray Serve ``autoscaling_config`` (e.g. ``{"min_replicas": 1, "max_replicas": 8,
            "target_ongoing_requests": 32}``), scaling on the requests each replica holds.
        ray_actor_options: per replica (``{"num_gpus": 1}`` for a replica per GPU; ``num_cpus``).
        settings: each replica's engine settings (max batch, queue, batching policy, limits).
        device: where each replica samples (default: the model's).
    """
    if autoscaling is None and (
        isinstance(num_replicas, bool) or not isinstance(num_replicas, int) or num_replicas < 1
    ):
        raise ValueError(f"num_replicas must be an int >= 1, got {num_replicas!r}")

    def asgi_app() -> FastAPI:  # evaluated on each replica when it starts
        return make_app(load_pipeline(model_spec, device), settings, replica=replica_name())

    options: dict[str, Any] = dict(
        name=DEPLOYMENT_NAME,
        ray_actor_options=dict(ray_actor_options or {}),
        max_ongoing_requests=settings.max_queue + settings.max_batch,
        max_queued_requests=settings.max_queue,
        request_router_config=RequestRouterConfig(request_router_class=LeastOutstandingRouter),
        graceful_shutdown_timeout_s=settings.request_timeout_s or 300.0,
    )
    if autoscaling is not None:
        options["autoscaling_config"] = dict(autoscaling)
    else:
        options["num_replicas"] = num_replicas
    return serve.deployment(serve.ingress(asgi_app)(), **options).bind()


def app_from_args(args: dict[str, Any]) -> serve.Application:
    """An application builder for ``serve run`` and KubeRay's ``serveConfigV2`` (``import_path:
    fastdiff.serving.ray:app_from_args``): ``args`` may hold ``model``, ``num_replicas``, ``min_replicas`` and
    ``max_replicas`` (autoscaling on ``target_ongoing_requests``, default the engine's ``max_batch``),
    ``num_gpus``/``num_cpus`` per replica, ``device`` and the :class:`ServeSettings` fields."""
    args = dict(args)
    settings = ServeSettings(
        **{name: _coerce(args.pop(name), _SETTING_TYPES[name]) for name in list(args) if name in _SETTING_TYPES}
    )
    actor = {k: float(args.pop(k)) for k in ("num_gpus", "num_cpus") if k in args}
    autoscaling = None
    if "min_replicas" in args or "max_replicas" in args:
        autoscaling = {
            "min_replicas": int(args.pop("min_replicas", 1)),
            "max_replicas": int(args.pop("max_replicas", 1)),
            "target_ongoing_requests": float(args.pop("target_ongoing_requests", settings.max_batch)),
        }
    app = build_app(
        args.pop("model", None),
        int(args.pop("num_replicas", 1)),
        autoscaling=autoscaling,
        ray_actor_options=actor,
        settings=settings,
        device=args.pop("device", None),
    )
    if args:
        raise ValueError(f"unknown fastdiff app arguments: {sorted(args)}")
    return app


_SETTING_TYPES = {
    "max_batch": int,
    "max_queue": int,
    "batching": str,
    "batch_wait_s": float,
    "max_n": int,
    "request_timeout_s": float,
    "threads": int,
}


def _coerce(value: Any, kind: type) -> Any:
    """A (string) argument from YAML or a command line as the settings field's type; None/"none" stay None."""
    return None if value is None or str(value).lower() == "none" else kind(value)


def serve_ray(
    model_spec: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings = ServeSettings(),
    num_replicas: int = 1,
    address: str | None = None,
    device: str | None = None,
    ray_actor_options: dict[str, Any] | None = None,
) -> None:
    """``fastdiff serve --ray``: starts a local Ray instance (or joins ``address``), deploys :func:`build_app` with
    Ray's HTTP proxy on ``host:port``, prints ``fastdiff serving on http://host:port``, and on SIGTERM/SIGINT
    shuts the application down (replicas drain their accepted requests first) and leaves Ray."""
    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(
            build_app(model_spec, num_replicas, ray_actor_options=ray_actor_options, settings=settings, device=device),
            name=DEPLOYMENT_NAME,
            route_prefix="/",
        )
        print(
            f"fastdiff serving on http://{host}:{port} (Ray Serve, {num_replicas} replicas, batching: "
            f"{settings.batching})",
            flush=True,
        )
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


__all__ = ["DEPLOYMENT_NAME", "app_from_args", "build_app", "replica_name", "serve_ray"]
