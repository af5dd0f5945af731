"""Random Chronos checkpoints built locally with chronos-forecasting's own classes.

No download: a small ``T5Config`` with a ``chronos_config`` dict makes a
``ChronosBoltModelForForecasting``; a ``Chronos2CoreConfig`` makes a ``Chronos2Model``; both are
saved with ``save_pretrained`` and then loaded through the same public path production uses
(``runtime.models.chronos.get_model`` -> ``BaseChronosPipeline.from_pretrained``). Random weights
give unordered quantiles: test shapes, finiteness and wiring, never forecast quality.

Also used by ``benchmarks/bench_chronos.py`` (:func:`build_bolt` with :data:`BOLT_TINY_SIZE`
builds a random model of the real ``amazon/chronos-bolt-tiny`` size).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

QUANTILES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]

# Tiny: ~20 k parameters, ~90 kB on disk, built in milliseconds.
TINY_SIZE: dict[str, int] = {
    "d_model": 16,
    "d_ff": 32,
    "d_kv": 8,
    "num_layers": 1,
    "num_decoder_layers": 1,
    "num_heads": 2,
}
# The published amazon/chronos-bolt-tiny architecture (config.json of the checkpoint): ~9 M
# parameters, context 2048, prediction length 64, patches of 16.
BOLT_TINY_SIZE: dict[str, int] = {
    "d_model": 256,
    "d_ff": 1024,
    "d_kv": 64,
    "num_layers": 4,
    "num_decoder_layers": 4,
    "num_heads": 4,
}


def build_bolt(
    path: Path,
    *,
    context_length: int = 256,
    prediction_length: int = 16,
    patch: int = 16,
    size: dict[str, int] | None = None,
    seed: int = 0,
) -> Path:
    """Save a random Chronos-Bolt checkpoint to ``path`` (created) and return ``path``.

    Args:
        path: target folder.
        context_length: most history the model reads [bars].
        prediction_length: horizon it was "trained" for [bars].
        patch: input patch size and stride [bars].
        size: T5 dimensions; default :data:`TINY_SIZE`.
        seed: torch seed, so the same arguments give the same weights.
    """
    import torch
    from chronos.chronos_bolt import ChronosBoltModelForForecasting
    from transformers import T5Config

    kwargs: dict[str, Any] = {
        **(size or TINY_SIZE),
        "vocab_size": 2,
        "feed_forward_proj": "relu",
        "dropout_rate": 0.0,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "initializer_factor": 0.05,
        # What makes it a Chronos-Bolt checkpoint for BaseChronosPipeline.from_pretrained:
        "chronos_config": {
            "context_length": context_length,
            "prediction_length": prediction_length,
            "input_patch_size": patch,
            "input_patch_stride": patch,
            "quantiles": QUANTILES,
            "use_reg_token": True,
        },
        "chronos_pipeline_class": "ChronosBoltPipeline",
        "architectures": ["ChronosBoltModelForForecasting"],
    }
    config = T5Config(**kwargs)
    torch.manual_seed(seed)
    ChronosBoltModelForForecasting(config).save_pretrained(path)
    return path


def build_chronos2(
    path: Path,
    *,
    context_length: int = 256,
    patch: int = 16,
    max_output_patches: int = 2,
    seed: int = 0,
) -> Path:
    """Save a random tiny Chronos-2 checkpoint to ``path`` and return ``path``.

    Args:
        path: target folder.
        context_length: most history the model reads [bars].
        patch: input/output patch size [bars]; the native horizon is
            ``patch * max_output_patches``.
        max_output_patches: output patches per step.
        seed: torch seed.
    """
    import torch
    from chronos.chronos2 import Chronos2Model
    from chronos.chronos2.config import Chronos2CoreConfig

    config = Chronos2CoreConfig(
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_heads=2,
        dropout_rate=0.0,
        chronos_config={
            "context_length": context_length,
            "input_patch_size": patch,
            "input_patch_stride": patch,
            "output_patch_size": patch,
            "quantiles": QUANTILES,
            "use_reg_token": True,
            "max_output_patches": max_output_patches,
        },
        chronos_pipeline_class="Chronos2Pipeline",
        architectures=["Chronos2Model"],
    )
    torch.manual_seed(seed)
    Chronos2Model(config).save_pretrained(path)
    return path


def install_in_hub_cache(checkpoint: Path, cache_dir: Path, repo_id: str, commit: str) -> Path:
    """Lay ``checkpoint`` out as huggingface_hub's cache does after a download of ``repo_id`` at
    ``commit`` (``models--org--name/{refs/main, snapshots/<commit>/...}``); returns the snapshot.

    This is what a Dockerfile that runs ``snapshot_download`` at build time leaves behind.
    """
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in checkpoint.iterdir():
        shutil.copy(f, snapshot / f.name)
    return snapshot


def count_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Count calls of the public loader: returns a list that gets one entry per load."""
    from chronos import BaseChronosPipeline

    calls: list[str] = []
    real = BaseChronosPipeline.from_pretrained.__func__  # type: ignore[attr-defined]

    def counting(cls: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(str(path))
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(BaseChronosPipeline, "from_pretrained", classmethod(counting))
    return calls
