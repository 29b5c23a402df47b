"""fastdiff's own checkpoints: one ``.safetensors`` file holds a network's weights and, in its metadata,
everything needed to sample from it (architecture and its config, schedule, prediction type, sample shape,
class conditioning). :func:`save` writes one, :func:`load` returns a ready :class:`fastdiff.Pipeline`.

Metadata keys (all strings; JSON where structured):
    ``fastdiff_format``  "1"
    ``architecture``     a name in :data:`fastdiff.nets.ARCHITECTURES` (e.g. "unet")
    ``config``           JSON: the architecture's constructor arguments
    ``schedule``         JSON: ``Schedule.config`` (kind and constructor arguments)
    ``prediction``       "eps", "x0", "v", "score" or "flow"
    ``sample_shape``     JSON list: the shape of one sample
    ``num_classes``      class labels the network takes as ``y`` (0: unconditional); label ``num_classes``
                         is the null class of classifier-free guidance
    ``extra``            JSON: anything else (training settings, data range, ...)
    ``tuned``            JSON list (optional): time grids fitted to these weights
                         (:class:`fastdiff.solvers.tuned.TunedGrid`, ``spacing="tuned"``)
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fastdiff.nets import ARCHITECTURES
from fastdiff.pipeline import Pipeline
from fastdiff.samplers import ALL_PREDICTIONS
from fastdiff.schedule import Schedule
from fastdiff.solvers.tuned import TunedGrid, TunedGrids, as_tuned_list, tuned_grids_from_json, weights_fingerprint

FORMAT_VERSION = "1"
PathLike = str | os.PathLike


def schedule_from_config(config: Mapping[str, Any]) -> Schedule:
    """Rebuilds a :class:`Schedule` from its ``config`` (as stored by :func:`save`)."""
    config = dict(config)
    kind = config.pop("kind", None)
    if "betas" in config:
        return Schedule.from_betas(config["betas"])
    builder = getattr(Schedule, str(kind), None) if kind else None
    if builder is None or kind in ("from_betas", "from_diffusers", "from_beta_function"):
        raise ValueError(f"schedule config has no known kind: {kind!r}")
    return builder(**config)


def save(
    path: PathLike,
    model: torch.nn.Module,
    schedule: Schedule,
    prediction: str,
    sample_shape: Sequence[int],
    extra: Mapping[str, Any] | None = None,
    tuned: TunedGrid | Sequence[TunedGrid] | None = None,
) -> None:
    """Writes ``model``'s weights and the metadata :func:`load` needs to ``path`` (a .safetensors file).

    ``model`` must be an instance of an architecture in :data:`fastdiff.nets.ARCHITECTURES` with a ``config``
    dict of its constructor arguments. The schedule must be rebuildable from ``schedule.config``. ``tuned``: time
    grids fitted to these weights (:func:`fastdiff.solvers.tune.tune`); a ValueError for one fitted to other weights.
    """
    arch = next((name for name, cls in ARCHITECTURES.items() if type(model) is cls), None)
    if arch is None:
        raise TypeError(f"model must be one of {sorted(ARCHITECTURES)} (fastdiff.nets), got {type(model).__name__}")
    if prediction not in ALL_PREDICTIONS:
        raise ValueError(f"prediction must be one of {ALL_PREDICTIONS}, got {prediction!r}")
    schedule_from_config(schedule.config)  # refuse now what load could not rebuild
    meta = {
        "fastdiff_format": FORMAT_VERSION,
        "architecture": arch,
        "config": json.dumps(model.config),
        "schedule": json.dumps(schedule.config),
        "prediction": prediction,
        "sample_shape": json.dumps([int(s) for s in sample_shape]),
        "num_classes": str(int(getattr(model, "num_classes", 0))),
        "extra": json.dumps(dict(extra or {})),
    }
    grids = as_tuned_list(tuned)
    if grids:
        checked = TunedGrids()
        fingerprint = weights_fingerprint(model)
        for grid in grids:
            checked.add(grid, fingerprint)
        meta["tuned"] = checked.to_json()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, os.fspath(path), metadata=meta)


def read_metadata(path: PathLike) -> dict[str, Any]:
    """The decoded metadata of a fastdiff checkpoint (ValueError if ``path`` is not one)."""
    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("fastdiff_format") != FORMAT_VERSION:
        raise ValueError(
            f"{os.fspath(path)} is not a fastdiff checkpoint (format {meta.get('fastdiff_format')!r}, "
            f"expected {FORMAT_VERSION!r})"
        )
    out: dict[str, Any] = dict(meta)
    for key in ("config", "schedule", "sample_shape", "extra"):
        out[key] = json.loads(meta[key])
    out["num_classes"] = int(meta["num_classes"])
    out["tuned"] = tuned_grids_from_json(meta["tuned"]) if "tuned" in meta else []
    return out


def save_tuned(path: PathLike, tuned: TunedGrid | Sequence[TunedGrid], out: PathLike | None = None) -> None:
    """Adds ``tuned`` grids to the checkpoint at ``path`` (replacing grids for the same settings), written to ``out``
    (default: ``path`` itself, replaced in one move). The weights and the other metadata are copied unchanged; a
    ValueError for a grid fitted to other weights."""
    meta = read_metadata(path)
    tensors = load_file(os.fspath(path))
    grids = TunedGrids()
    fingerprint = weights_fingerprint(tensors)
    for grid in meta["tuned"] + as_tuned_list(tuned):
        grids.add(grid, fingerprint)
    with safe_open(os.fspath(path), framework="pt") as f:
        raw = dict(f.metadata())
    raw["tuned"] = grids.to_json()
    target = os.fspath(path if out is None else out)
    partial = target + ".partial"
    save_file(tensors, partial, metadata=raw)
    os.replace(partial, target)


def load_model(path: PathLike, device: str | torch.device | None = None) -> tuple[torch.nn.Module, dict]:
    """The network of a checkpoint (eval mode, no gradients) and its metadata."""
    meta = read_metadata(path)
    cls = ARCHITECTURES.get(meta["architecture"])
    if cls is None:
        raise ValueError(f"unknown architecture {meta['architecture']!r}; known: {sorted(ARCHITECTURES)}")
    model = cls(**meta["config"])
    model.load_state_dict(load_file(os.fspath(path)))
    model.requires_grad_(False).eval()
    if device is not None:
        model.to(device)
    return model, meta


def load(
    path: PathLike, device: str | torch.device | None = None, dtype: torch.dtype | None = None, **pipeline_kwargs: Any
) -> Pipeline:
    """A ready :class:`Pipeline` on the checkpoint at ``path`` (written by :func:`save`).

    The pipeline's ``sample_shape`` is the checkpoint's, its ``tuned`` the checkpoint's tuned grids (a grid whose
    fingerprint is not that of the stored weights is left out, with a warning); for a class-conditional network
    pass labels as ``model_kwargs={"y": labels}`` and, for guidance,
    ``uncond_kwargs={"y": labels.new_full((n,), pipe.num_classes)}``.
    """
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    model, meta = load_model(path, device)
    fingerprint = weights_fingerprint(model) if meta["tuned"] else None  # of the weights as stored, before a cast
    if dtype is not None:
        model.to(dtype)
    pipe = Pipeline(
        model,
        schedule_from_config(meta["schedule"]),
        prediction=meta["prediction"],
        device=device,
        dtype=dtype,
        sample_shape=meta["sample_shape"],
        num_classes=meta["num_classes"],
        **pipeline_kwargs,
    )
    pipe.metadata = meta
    for grid in meta["tuned"]:
        try:
            pipe.add_tuned(grid, fingerprint)
        except ValueError as exc:  # the file's weights are not those the grid was fitted to
            warnings.warn(f"{os.fspath(path)}: {exc}; it is left out", stacklevel=2)
    return pipe
