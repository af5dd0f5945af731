"""Chronos forecasting models: loaded once per process, shared, forecasting batches of series.

:func:`get_model` loads a Chronos, Chronos-Bolt or Chronos-2 checkpoint (Hugging Face Hub id or
local folder) through chronos-forecasting's public ``BaseChronosPipeline.from_pretrained`` and
keeps it in a process-level cache keyed by (model, revision, cache folder, device, dtype). The
runner calls it once for an agent that declares ``requires_model = True`` and hands the same
:class:`ChronosModel` to every strategy instance (optimisation runs included); an agent used on
its own (notebook, test) calls :func:`get_model` itself and gets the cached instance.

:meth:`ChronosModel.forecast` takes many series and makes ONE ``predict_quantiles`` call for all
of them, returning a ``(series, horizon, levels)`` array whatever the model family (Chronos-2
returns a list of per-series tensors and wants 3-D ``(series, variates, time)`` input; Chronos
and Chronos-Bolt take 2-D input and return one tensor).

Loading makes no network call for a local folder. For a hub id, ``huggingface_hub`` looks in its
cache and, unless ``HF_HUB_OFFLINE=1``, asks the Hub (about 20 s of retries without a network).
Every failure raises :class:`~core.errors.ConfigError` saying what was tried and how to
provide the checkpoint.

Thread context: :func:`get_model` is thread-safe (one lock around the cache, held while loading,
so a model is never loaded twice); :meth:`ChronosModel.forecast` is called on the main
(backtrader) thread.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from core.errors import ConfigError
from runtime.models.config import ChronosConfig

__all__ = [
    "ChronosConfig",
    "ChronosModel",
    "Forecast",
    "cached_models",
    "clear_cache",
    "get_model",
    "load_model",
    "resolve_device",
]

logger = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
_KINDS = {
    "Chronos2Pipeline": "chronos-2",
    "ChronosBoltPipeline": "chronos-bolt",
    "ChronosPipeline": "chronos",
}
# A model whose pipeline does not say how much history it reads gets this many bars at most.
_FALLBACK_CONTEXT = 512
_MAX_ERROR_CHARS = 400


class Forecast(NamedTuple):
    """The result of one batched forecast call.

    Attributes:
        quantiles: ``(series, horizon, levels)`` float64, in the units of the input series
            (prices in, prices out); ``quantiles[i, h, k]`` is the ``levels[k]`` quantile of
            series ``i`` at ``h + 1`` steps ahead.
        levels: the quantile levels, in the order of the last axis.
        latency_s: wall time of the single ``predict_quantiles`` call, seconds.
        context_lengths: bars of history each series actually gave the model (after truncation
            to the model's maximum context).
    """

    quantiles: np.ndarray
    levels: tuple[float, ...]
    latency_s: float
    context_lengths: tuple[int, ...]


class ChronosModel:
    """A loaded Chronos pipeline plus what a decision record needs to know about it.

    Build with :func:`get_model` (cached) or :func:`load_model`; the constructor is public so a
    test can wrap a pipeline whose forecast it controls (any object with chronos-forecasting's
    ``predict_quantiles(inputs, prediction_length=, quantile_levels=)`` signature).

    Args:
        pipeline: a ``BaseChronosPipeline`` (or a stand-in with the same ``predict_quantiles``).
        model_id: hub id or local path it was loaded from.
        revision: hub commit of the snapshot, or ``blake2b:<hex>`` of a local folder's files.
        device: ``cpu`` or ``cuda`` (resolved, never ``auto``).
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        load_s: time the load took, seconds.
    """

    def __init__(
        self,
        pipeline: Any,
        *,
        model_id: str,
        revision: str,
        device: str = "cpu",
        dtype: str = "float32",
        load_s: float = 0.0,
    ) -> None:
        self.pipeline = pipeline
        self.model_id = model_id
        self.revision = revision
        self.device = device
        self.dtype = dtype
        self.load_s = load_s
        self.kind = _KINDS.get(type(pipeline).__name__, type(pipeline).__name__)
        # Chronos-2 reads (series, variates, time); the older families read (series, time).
        self._three_d = self.kind == "chronos-2"

    @property
    def max_context_length(self) -> int:
        """Longest history the model reads, bars (longer inputs are cut to their last part)."""
        try:
            return int(self.pipeline.model_context_length)
        except (AttributeError, NotImplementedError, TypeError):
            return _FALLBACK_CONTEXT

    @property
    def prediction_length(self) -> int | None:
        """Horizon the model was trained for, bars; longer horizons are rolled out and degrade."""
        try:
            return int(self.pipeline.model_prediction_length)
        except (AttributeError, NotImplementedError, TypeError):
            return None

    def describe(self) -> dict[str, str]:
        """``{"model", "revision", "kind", "device", "dtype"}``: the provenance of a forecast."""
        return {
            "model": self.model_id,
            "revision": self.revision,
            "kind": self.kind,
            "device": self.device,
            "dtype": self.dtype,
        }

    def __repr__(self) -> str:
        return (
            f"ChronosModel({self.model_id}@{self.revision[:19]}, {self.kind}, {self.device}, "
            f"{self.dtype})"
        )

    def forecast(
        self,
        contexts: Sequence[np.ndarray | Sequence[float]],
        horizon: int,
        levels: Sequence[float],
    ) -> Forecast:
        """Forecast every series with ONE ``predict_quantiles`` call.

        Series of different lengths are left-padded with NaN (Chronos treats NaN as missing);
        each is first cut to its last :attr:`max_context_length` values.

        Args:
            contexts: ``series`` 1-D histories, oldest first, most recent last (>= 1 value each).
            horizon: steps to forecast, bars (>= 1).
            levels: quantile levels in (0, 1), e.g. ``(0.1, 0.5, 0.9)``.

        Returns:
            A :class:`Forecast` with ``quantiles`` of shape ``(series, horizon, len(levels))``.

        Raises:
            ValueError: no series, an empty series, ``horizon < 1`` or a level outside (0, 1).
            RuntimeError: the pipeline returned a forecast of an unexpected shape.
        """
        if not contexts:
            raise ValueError("forecast needs at least one series")
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1 bar, got {horizon}")
        if not levels or any(not 0.0 < q < 1.0 for q in levels):
            raise ValueError(f"quantile levels must lie in (0, 1), got {list(levels)}")
        arrays = [np.asarray(c, dtype=np.float32)[-self.max_context_length :] for c in contexts]
        for i, arr in enumerate(arrays):
            if arr.ndim != 1 or arr.size == 0:
                raise ValueError(
                    f"series {i}: expected a non-empty 1-D history, got shape {arr.shape}"
                )
        width = max(arr.size for arr in arrays)
        batch = np.full((len(arrays), width), np.nan, dtype=np.float32)
        for i, arr in enumerate(arrays):
            batch[i, width - arr.size :] = arr
        inputs = torch.from_numpy(batch)
        if self._three_d:
            inputs = inputs.unsqueeze(1)
        t0 = time.perf_counter()
        with torch.inference_mode():
            quantiles, _mean = self.pipeline.predict_quantiles(
                inputs, prediction_length=horizon, quantile_levels=list(levels)
            )
        latency_s = time.perf_counter() - t0
        if isinstance(quantiles, (list, tuple)):  # Chronos-2: one (variates, H, Q) per series
            quantiles = torch.stack([q.reshape(q.shape[-2], q.shape[-1]) for q in quantiles])
        out = quantiles.detach().to(device="cpu", dtype=torch.float64).numpy()
        expected = (len(arrays), horizon, len(levels))
        if out.shape != expected:
            raise RuntimeError(f"{self!r}: forecast shape {out.shape}, expected {expected}")
        return Forecast(
            out, tuple(float(q) for q in levels), latency_s, tuple(int(arr.size) for arr in arrays)
        )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``.

    Raises:
        ConfigError: ``cuda`` asked for but torch sees no CUDA device.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"CHRONOS_DEVICE=cuda but torch {torch.__version__} sees no CUDA device "
            f"(built for CUDA {torch.version.cuda or 'none'}); use cpu or auto"
        )
    return device


def _local_path(model: str) -> Path | None:
    """The folder ``model`` names, or ``None`` when it reads as a hub id."""
    path = Path(model).expanduser()
    if path.exists() or model.startswith(("/", ".", "~")) or not _HUB_ID.match(model):
        return path
    return None


def _folder_revision(folder: Path) -> str:
    """The hub commit a folder came from, else ``blake2b:`` of config.json and the weights.

    The commit is known for a hub cache snapshot (``.../snapshots/<commit>``) and for a folder
    written by ``snapshot_download(local_dir=...)`` (huggingface_hub keeps
    ``.cache/huggingface/download/config.json.metadata``: commit, etag, timestamp; trusted only
    while config.json is not newer than it, the rule huggingface_hub itself applies).
    """
    resolved = folder.resolve()
    if _COMMIT.match(resolved.name) and resolved.parent.name == "snapshots":
        return resolved.name
    meta = resolved / ".cache" / "huggingface" / "download" / "config.json.metadata"
    try:
        commit, _etag, stamp = meta.read_text().splitlines()[:3]
        if _COMMIT.match(commit) and (resolved / "config.json").stat().st_mtime - 1 <= float(stamp):
            return commit
    except (OSError, ValueError):
        pass  # no (usable) download metadata: hash the content
    digest = hashlib.blake2b(digest_size=16)
    for f in sorted(
        p
        for p in resolved.iterdir()
        if p.name == "config.json" or p.name.endswith(_WEIGHT_SUFFIXES)
    ):
        digest.update(f.name.encode())
        with f.open("rb") as fh:
            digest.update(hashlib.file_digest(fh, "blake2b").digest())
    return f"blake2b:{digest.hexdigest()}"


def _hub_revision(config: ChronosConfig) -> str:
    """The commit of the cached snapshot that was loaded (the cache path names it)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(
        config.model,
        "config.json",
        cache_dir=str(config.cache_dir) if config.cache_dir else None,
        revision=config.revision,
    )
    if isinstance(found, str):
        parts = Path(found).parts
        if "snapshots" in parts[:-1]:
            return parts[parts.index("snapshots") + 1]
    return config.revision or "main"


def _failure(config: ChronosConfig, local: Path | None, device: str, what: str) -> str:
    """The ConfigError text: what was tried, why it failed, how to provide the model."""
    from huggingface_hub import constants

    if local is not None:
        tried = f"the local folder {local}"
    else:
        cache = config.cache_dir or constants.HF_HUB_CACHE
        online = "offline (HF_HUB_OFFLINE)" if constants.is_offline_mode() else "online"
        tried = (
            f"the Hugging Face Hub id {config.model!r} at revision "
            f"{config.revision or 'main'}, cache {cache}, {online}"
        )
    return (
        f"cannot load Chronos model CHRONOS_MODEL={config.model!r} on {device}/"
        f"{config.dtype}: tried {tried}: {what}. Provide the checkpoint one of these ways: "
        "(1) a local folder holding config.json and model.safetensors, "
        "CHRONOS_MODEL=/models/chronos-bolt-tiny; (2) a Hugging Face cache that already holds "
        "it, CHRONOS_CACHE_DIR=/path/to/hub (or HF_HOME) with HF_HUB_OFFLINE=1; (3) bake it "
        "into the container image at build time (README, Chronos agent: Dockerfile)"
    )


def load_model(config: ChronosConfig) -> ChronosModel:
    """Load a checkpoint through ``BaseChronosPipeline.from_pretrained`` (not cached: use
    :func:`get_model`).

    Args:
        config: model id or folder, device, dtype, hub revision and cache folder.

    Returns:
        The loaded model, weights on ``device`` in ``dtype``, in eval mode.

    Raises:
        ConfigError: the folder does not exist or holds no config.json, the hub id is neither
            cached nor downloadable, the checkpoint is not a Chronos one, or ``cuda`` is not
            available. The message says what was tried and how to provide the model.
    """
    from chronos import BaseChronosPipeline

    device = resolve_device(config.device)
    local = _local_path(config.model)
    kwargs: dict[str, Any] = {"device_map": device, "dtype": _DTYPES[config.dtype]}
    if local is not None:
        if not local.is_dir():
            raise ConfigError(_failure(config, local, device, "no such folder"))
        if not (local / "config.json").is_file():
            raise ConfigError(_failure(config, local, device, "it has no config.json"))
        target = str(local)
    else:
        if config.revision:
            kwargs["revision"] = config.revision
        if config.cache_dir:
            kwargs["cache_dir"] = str(config.cache_dir)
        target = config.model
    from transformers.utils import logging as hf_logging

    # transformers draws tqdm bars on stderr while loading: noise in JSON container logs.
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    t0 = time.perf_counter()
    try:
        pipeline = BaseChronosPipeline.from_pretrained(target, **kwargs)
    # transformers/huggingface_hub raise OSError (not found, no network), ValueError (not a
    # Chronos config, unknown class) and AssertionError (chronos' own config checks).
    except (OSError, ValueError, AssertionError, KeyError) as e:
        text = " ".join(str(e).split())[:_MAX_ERROR_CHARS].rstrip(".")
        raise ConfigError(_failure(config, local, device, f"{type(e).__name__}: {text}")) from e
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    load_s = time.perf_counter() - t0
    inner = getattr(pipeline, "inner_model", None)
    if inner is not None:
        inner.eval()
    revision = _folder_revision(local) if local is not None else _hub_revision(config)
    model = ChronosModel(
        pipeline,
        model_id=config.model,
        revision=revision,
        device=device,
        dtype=config.dtype,
        load_s=load_s,
    )
    logger.info(
        "loaded %r in %.2f s (context up to %d bars)", model, load_s, model.max_context_length
    )
    return model


_CACHE: dict[tuple[str, str | None, str | None, str, str], ChronosModel] = {}
_LOCK = threading.Lock()


def get_model(config: ChronosConfig | None = None) -> ChronosModel:
    """The process's shared model for ``config``: loaded at the first call, cached after.

    Args:
        config: ``None`` = :class:`ChronosConfig` defaults (``amazon/chronos-bolt-tiny``, cpu).

    Returns:
        The same :class:`ChronosModel` object for every call with an equal config (device
        ``auto`` resolved first, so ``auto`` and ``cpu`` share a model on a CPU machine).

    Raises:
        ConfigError: see :func:`load_model`; nothing is cached on failure.
    """
    config = config or ChronosConfig()
    key = (
        config.model,
        config.revision,
        str(config.cache_dir) if config.cache_dir else None,
        resolve_device(config.device),
        config.dtype,
    )
    with _LOCK:
        model = _CACHE.get(key)
        if model is None:
            model = _CACHE[key] = load_model(config)
        return model


def cached_models() -> tuple[ChronosModel, ...]:
    """Every model loaded by :func:`get_model` in this process, in load order."""
    with _LOCK:
        return tuple(_CACHE.values())


def clear_cache() -> None:
    """Forget every cached model (tests; frees memory once no strategy holds a reference)."""
    with _LOCK:
        _CACHE.clear()
