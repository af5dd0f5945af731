"""runtime.models: loading Chronos checkpoints once, through the public path, and forecasting.

Models are tiny random checkpoints built locally (tests/chronos_models.py); nothing downloads.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core.errors import ConfigError
from feeds.csv import CSVFeedConfig, read_csv_bars
from runtime.config import BUNDLED_DATA_DIR, load_config
from runtime.models.chronos import ChronosModel, cached_models, get_model, load_model
from runtime.models.config import ChronosConfig
from tests.chronos_models import build_bolt, count_loads, install_in_hub_cache

pytestmark = pytest.mark.usefixtures("offline_hub", "fresh_models")


def closes(symbol: str) -> np.ndarray:
    path = BUNDLED_DATA_DIR / f"{symbol}.csv"
    return read_csv_bars(CSVFeedConfig(path=path, symbol=symbol)).numeric["close"]


def test_tiny_checkpoints_are_small(bolt_dir: Path, chronos2_dir: Path) -> None:
    for folder in (bolt_dir, chronos2_dir):
        assert (folder / "config.json").is_file()
        assert sum(f.stat().st_size for f in folder.iterdir()) < 1_000_000


@pytest.mark.parametrize(
    "which, kind", [("bolt_dir", "chronos-bolt"), ("chronos2_dir", "chronos-2")]
)
def test_forecast_real_series_shapes_and_finite(
    which: str, kind: str, request: pytest.FixtureRequest
) -> None:
    folder: Path = request.getfixturevalue(which)
    model = get_model(ChronosConfig(model=str(folder)))
    assert model.kind == kind
    assert model.max_context_length == 256
    # Different lengths, one longer than the model reads: left-padded, then truncated.
    series = [closes("GOOG")[:300], closes("SP500")[:100], closes("NASDAQ")[:40]]
    fc = model.forecast(series, horizon=7, levels=(0.1, 0.5, 0.9))
    assert fc.quantiles.shape == (3, 7, 3)
    assert fc.quantiles.dtype == np.float64
    assert np.isfinite(fc.quantiles).all()
    assert fc.context_lengths == (256, 100, 40)
    assert fc.levels == (0.1, 0.5, 0.9)
    assert fc.latency_s > 0
    # Random weights, but the output is de-normalised with each series' own scale.
    assert 0.05 < float(np.median(fc.quantiles[0])) / float(series[0][-256:].mean()) < 20


@pytest.mark.parametrize("which", ["bolt_dir", "chronos2_dir"])
def test_batched_equals_one_call_per_series(which: str, request: pytest.FixtureRequest) -> None:
    model = get_model(ChronosConfig(model=str(request.getfixturevalue(which))))
    series = [closes(s)[-128:] for s in ("GOOG", "SP500", "NASDAQ")]
    together = model.forecast(series, horizon=5, levels=(0.2, 0.5, 0.8)).quantiles
    alone = np.concatenate(
        [model.forecast([s], horizon=5, levels=(0.2, 0.5, 0.8)).quantiles for s in series]
    )
    np.testing.assert_allclose(together, alone, rtol=1e-4)
    # Swapping two series swaps their forecasts: nothing leaks between batch rows.
    swapped = model.forecast(series[::-1], horizon=5, levels=(0.2, 0.5, 0.8)).quantiles
    np.testing.assert_allclose(swapped[::-1], together, rtol=1e-4)


def test_one_predict_call_per_forecast(bolt_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = get_model(ChronosConfig(model=str(bolt_dir)))
    calls: list[tuple[int, ...]] = []
    real = model.pipeline.predict_quantiles

    def spy(inputs: torch.Tensor, **kw: object) -> object:
        calls.append(tuple(inputs.shape))
        return real(inputs, **kw)

    monkeypatch.setattr(model.pipeline, "predict_quantiles", spy)
    model.forecast([closes("GOOG")[-50:]] * 100, horizon=4, levels=(0.1, 0.5, 0.9))
    assert calls == [(100, 50)]


def test_model_is_loaded_once_per_config(bolt_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads = count_loads(monkeypatch)
    first = get_model(ChronosConfig(model=str(bolt_dir)))
    assert get_model(ChronosConfig(model=str(bolt_dir))) is first
    assert get_model(ChronosConfig(model=str(bolt_dir), device="auto")) is first  # no GPU here
    assert loads == [str(bolt_dir)]
    other = get_model(ChronosConfig(model=str(bolt_dir), dtype="bfloat16"))
    assert other is not first and other.dtype == "bfloat16"
    assert len(loads) == 2
    assert cached_models() == (first, other)


def test_bfloat16_weights_forecast_finite(bolt_dir: Path) -> None:
    model = get_model(ChronosConfig(model=str(bolt_dir), dtype="bfloat16"))
    assert next(model.pipeline.inner_model.parameters()).dtype == torch.bfloat16
    fc = model.forecast([closes("GOOG")[-64:]], horizon=3, levels=(0.1, 0.5, 0.9))
    assert fc.quantiles.shape == (1, 3, 3) and np.isfinite(fc.quantiles).all()


def test_revision_of_local_folder_is_content_hash(tmp_path: Path, bolt_dir: Path) -> None:
    a = get_model(ChronosConfig(model=str(bolt_dir)))
    assert a.revision.startswith("blake2b:") and len(a.revision) == len("blake2b:") + 32
    assert a.describe() == {
        "model": str(bolt_dir),
        "revision": a.revision,
        "kind": "chronos-bolt",
        "device": "cpu",
        "dtype": "float32",
    }
    other = build_bolt(tmp_path / "other", seed=1)  # same architecture, other weights
    assert load_model(ChronosConfig(model=str(other))).revision != a.revision


def test_revision_of_snapshot_download_folder_is_its_commit(tmp_path: Path, bolt_dir: Path) -> None:
    # What `snapshot_download(repo, local_dir=...)` (the Dockerfile bake) leaves next to the files.
    folder = tmp_path / "baked"
    shutil.copytree(bolt_dir, folder)
    meta = folder / ".cache" / "huggingface" / "download"
    meta.mkdir(parents=True)
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    (meta / "config.json.metadata").write_text(f'{commit}\n"etag"\n{time.time() + 5}\n')
    assert load_model(ChronosConfig(model=str(folder))).revision == commit
    # Edited after the download: the metadata no longer vouches for it.
    (meta / "config.json.metadata").write_text(f'{commit}\n"etag"\n{time.time() - 60}\n')
    (folder / "config.json").touch()  # the edit (copytree kept the session fixture's old mtime)
    assert load_model(ChronosConfig(model=str(folder))).revision.startswith("blake2b:")


def test_hub_id_loads_from_prefilled_cache_offline(tmp_path: Path, bolt_dir: Path) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    install_in_hub_cache(bolt_dir, tmp_path / "hub", "amazon/chronos-bolt-tiny", commit)
    model = get_model(ChronosConfig(model="amazon/chronos-bolt-tiny", cache_dir=tmp_path / "hub"))
    assert model.kind == "chronos-bolt"
    assert model.model_id == "amazon/chronos-bolt-tiny"
    assert model.revision == commit
    assert model.forecast([closes("SP500")[-64:]], 4, (0.1, 0.5, 0.9)).quantiles.shape == (1, 4, 3)


def test_missing_hub_model_says_what_was_tried(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        get_model(ChronosConfig(model="amazon/chronos-bolt-tiny", cache_dir=tmp_path))
    text = str(err.value)
    assert "'amazon/chronos-bolt-tiny'" in text and str(tmp_path) in text
    assert "offline" in text and "OSError" in text
    assert "CHRONOS_MODEL=/" in text and "HF_HUB_OFFLINE=1" in text and "image" in text
    assert cached_models() == ()  # nothing cached on failure


def test_missing_folder_and_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"local folder .*nope: no such folder"):
        get_model(ChronosConfig(model=str(tmp_path / "nope")))
    with pytest.raises(ConfigError, match="no such folder"):
        get_model(ChronosConfig(model="./relative/missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"has no config\.json"):
        get_model(ChronosConfig(model=str(tmp_path / "empty")))


def test_non_chronos_checkpoint_is_refused(tmp_path: Path) -> None:
    from transformers import T5Config

    folder = tmp_path / "plain-t5"
    T5Config(d_model=8, d_ff=8, num_layers=1, num_heads=1, d_kv=8).save_pretrained(folder)
    with pytest.raises(ConfigError, match="ValueError: Not a Chronos config"):
        get_model(ChronosConfig(model=str(folder)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="machine has a GPU")
def test_cuda_without_gpu_is_a_config_error(bolt_dir: Path) -> None:
    with pytest.raises(ConfigError, match="CHRONOS_DEVICE=cuda"):
        get_model(ChronosConfig(model=str(bolt_dir), device="cuda"))


def test_forecast_rejects_bad_input(bolt_dir: Path) -> None:
    model = get_model(ChronosConfig(model=str(bolt_dir)))
    with pytest.raises(ValueError, match="at least one series"):
        model.forecast([], 4, (0.5,))
    with pytest.raises(ValueError, match="non-empty"):
        model.forecast([np.array([])], 4, (0.5,))
    with pytest.raises(ValueError, match="horizon"):
        model.forecast([np.ones(10)], 0, (0.5,))
    with pytest.raises(ValueError, match="levels"):
        model.forecast([np.ones(10)], 4, (0.0, 0.5))


def test_repr_and_params_json_stay_short(bolt_dir: Path) -> None:
    model = get_model(ChronosConfig(model=str(bolt_dir)))
    text = repr(model)
    assert text.startswith(f"ChronosModel({bolt_dir}@blake2b:") and "cpu, float32" in text
    assert json.loads(json.dumps({"model": model}, default=str))["model"] == text


def test_stand_in_pipeline_is_accepted() -> None:
    class Constant:
        def predict_quantiles(
            self, inputs: torch.Tensor, prediction_length: int, quantile_levels: list[float]
        ) -> tuple[torch.Tensor, torch.Tensor]:
            q = torch.tensor(quantile_levels).expand(inputs.shape[0], prediction_length, -1)
            return q, q[..., 0]

    model = ChronosModel(Constant(), model_id="stand-in", revision="r1")
    assert model.kind == "Constant" and model.max_context_length == 512
    fc = model.forecast([np.arange(1000.0)], 2, (0.25, 0.75))
    assert fc.context_lengths == (512,)
    np.testing.assert_allclose(fc.quantiles, [[[0.25, 0.75], [0.25, 0.75]]])


def test_config_from_environment(tmp_path: Path) -> None:
    cfg = load_config(
        {
            "CHRONOS_MODEL": str(tmp_path),
            "CHRONOS_DEVICE": "auto",
            "CHRONOS_DTYPE": "bfloat16",
            "CHRONOS_REVISION": "v1.0",
            "CHRONOS_CACHE_DIR": str(tmp_path / "hub"),
        }
    ).chronos
    assert cfg == ChronosConfig(
        model=str(tmp_path),
        device="auto",
        dtype="bfloat16",
        revision="v1.0",
        cache_dir=tmp_path / "hub",
    )
    assert load_config({}).chronos == ChronosConfig()
    with pytest.raises(ConfigError, match="CHRONOS_DEVICE"):
        load_config({"CHRONOS_DEVICE": "tpu"})
    with pytest.raises(ConfigError, match="CHRONOS_MODLE"):
        load_config({"CHRONOS_MODLE": "x"})
    with pytest.raises(ConfigError, match="CHRONOS_MODEL must not be empty"):
        ChronosConfig(model=" ")
