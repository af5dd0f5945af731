"""The disk cache of CSV bars' data hashes (``core.bar_hash_cache``): a hit gives exactly the
hashes the bars would get without it; any change to the bars is a miss; a damaged, foreign or
unwritable cache changes nothing but the time it takes."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import platformdirs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core import bar_hash_cache
from core.bars import bar_hashes
from feeds.csv import CSVBars, CSVFeedConfig, RowHashes, prefetch_hashes, read_csv_bars
from tests.conftest import DATA


def _bars(symbol: str = "GOOG") -> CSVBars:
    return read_csv_bars(CSVFeedConfig(path=DATA / f"{symbol}.csv", symbol=symbol))


def _truth(bars: CSVBars) -> list[str]:
    """The hashes computed directly, without any cache."""
    times_us = bars.times.astype("datetime64[us]").astype(np.int64)
    return bar_hashes(bars.symbol, times_us, bars.numeric, bars.text)


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    folder = tmp_path / "hashes"
    bar_hash_cache.configure(folder)
    yield folder
    bar_hash_cache.configure("off")


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob(f"*{bar_hash_cache.SUFFIX}"))


def test_a_series_is_kept_once_complete_and_read_back_exactly(cache: Path) -> None:
    truth = _truth(_bars())
    first = _bars()
    assert list(first.hashes) == truth  # computed block by block, stored when complete
    [path] = _files(cache)
    assert path.stat().st_size == (len(truth) + 1) * bar_hash_cache.DIGEST_BYTES
    again = _bars()
    assert isinstance(again.hashes, RowHashes)
    assert again.hashes.from_disk()  # every hash known before any is asked for
    assert list(again.hashes) == truth


def test_the_helper_is_not_started_for_a_series_the_cache_holds(cache: Path) -> None:
    truth = {s: _truth(_bars(s)) for s in ("GOOG", "SP500")}
    bars = [_bars(s) for s in ("GOOG", "SP500")]
    job = prefetch_hashes([b.hashes for b in bars])
    assert job is not None
    assert [list(b.hashes) for b in bars] == list(truth.values())
    assert len(_files(cache)) == 2  # the helper's results were kept
    again = [_bars(s) for s in ("GOOG", "SP500")]
    assert prefetch_hashes([b.hashes for b in again]) is None  # nothing left to hash
    assert [list(b.hashes) for b in again] == list(truth.values())


def test_off_keeps_nothing(tmp_path: Path) -> None:
    bar_hash_cache.configure("off")
    assert bar_hash_cache.folder() is None
    bars = _bars()
    assert list(bars.hashes) == _truth(bars)
    assert not list(tmp_path.iterdir())


def test_the_folder_is_the_users_cache_folder_until_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.undo()  # the suite's own default folder (tests/conftest.py): the real one here
    monkeypatch.setattr(bar_hash_cache, "_configured", False)
    monkeypatch.setenv(bar_hash_cache.ENV, "off")  # the library does not read the environment
    real = Path(platformdirs.user_cache_dir("fmel"), "bar-hashes")
    assert bar_hash_cache.folder() == bar_hash_cache.default_folder() == real
    assert bar_hash_cache.configure(tmp_path / "x") == tmp_path / "x" == bar_hash_cache.folder()
    assert bar_hash_cache.configure("OFF") is None is bar_hash_cache.folder()
    assert bar_hash_cache.configure("") == real
    assert bar_hash_cache.configure("~/x") == Path.home() / "x"
    bar_hash_cache.configure("off")


@pytest.mark.parametrize("damage", ["truncate", "flip", "extend", "empty"])
def test_a_damaged_file_is_computed_again_and_replaced(cache: Path, damage: str) -> None:
    truth = _truth(_bars())
    list(_bars().hashes)
    [path] = _files(cache)
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        raw = raw[:-1]
    elif damage == "flip":
        raw[100] ^= 0x01
    elif damage == "extend":
        raw += raw[:16]
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    bars = _bars()
    assert not bars.hashes.from_disk()
    assert list(bars.hashes) == truth
    assert path.read_bytes() != bytes(raw)  # stored again, whole
    assert list(_bars().hashes) == truth


def test_a_file_of_another_series_under_the_key_is_refused(cache: Path) -> None:
    """The same bars under two symbols: two keys, files of the same length. One copied over
    the other (a backup restored, a sync tool) is refused by its checksum, which covers the
    key; the series is hashed again."""
    path = DATA / "GOOG.csv"
    a, b = (read_csv_bars(CSVFeedConfig(path=path, symbol=s)) for s in ("AAA", "BBB"))
    list(a.hashes)
    list(b.hashes)
    [fa] = [p for p in _files(cache) if p.name.startswith(_key_of(a))]
    [fb] = [p for p in _files(cache) if p.name.startswith(_key_of(b))]
    assert fa.stat().st_size == fb.stat().st_size
    fb.write_bytes(fa.read_bytes())
    again = read_csv_bars(CSVFeedConfig(path=path, symbol="BBB"))
    assert not again.hashes.from_disk()
    assert list(again.hashes) == _truth(again) != _truth(a)


def _key_of(bars: CSVBars) -> str:
    h = bars.hashes
    return bar_hash_cache.cache_key(bars.symbol, h._times, h._numeric, h._text)


@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "sparse", "folder", "dangling"])
def test_what_is_not_a_regular_file_of_the_length_is_not_read(cache: Path, kind: str) -> None:
    """A pipe at the key's path would block a read forever, /dev/zero or a huge file would
    fill memory: only a regular file of exactly the series' length is read."""
    bars = _bars()
    path = cache / f"{_key_of(bars)}{bar_hash_cache.SUFFIX}"
    cache.mkdir(parents=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev_zero":
        path.symlink_to("/dev/zero")
    elif kind == "sparse":
        with path.open("wb") as f:
            f.truncate(3 * 2**30)
    elif kind == "folder":
        path.mkdir()
    else:
        path.symlink_to(cache / "nowhere")
    assert not bars.hashes.from_disk()
    assert list(bars.hashes) == _truth(bars)


def test_no_home_directory_means_no_cache_said_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.undo()  # the real default_folder, over a platformdirs that cannot find a home

    def no_home(*_: object, **__: object) -> str:
        raise RuntimeError("could not determine the home directory for '~/.cache'")

    monkeypatch.setattr(bar_hash_cache.platformdirs, "user_cache_dir", no_home)
    monkeypatch.setattr(bar_hash_cache, "_warned", set())
    with caplog.at_level(logging.INFO, logger="core.bar_hash_cache"):
        assert bar_hash_cache.configure("") is None
        for _ in range(2):
            bars = _bars()
            assert list(bars.hashes) == _truth(bars)
        assert bar_hash_cache.configure("~nosuchuser-fmel/x") is None
    said = [r.getMessage() for r in caplog.records if r.name == "core.bar_hash_cache"]
    assert len(said) == 2 and "no user cache folder" in said[0] and "nosuchuser" in said[1]


@pytest.mark.parametrize("word", ["false", "No", "0", "none", " TRUE ", "disabled"])
def test_a_switch_word_is_refused_not_taken_for_a_folder(
    word: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"FMEL_HASH_CACHE_DIR=.*expected a folder, off"):
        bar_hash_cache.configure(word)
    assert bar_hash_cache.folder() is None  # still as it was: off
    bars = _bars()
    assert list(bars.hashes) == _truth(bars)
    assert not list(tmp_path.iterdir())  # no folder named after the word


def test_a_relative_folder_is_fixed_when_configured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    where = bar_hash_cache.configure("rel/hashes")
    assert where == tmp_path / "rel" / "hashes" == bar_hash_cache.folder()
    monkeypatch.chdir("/")
    list(_bars().hashes)
    assert len(_files(tmp_path / "rel" / "hashes")) == 1
    bar_hash_cache.configure("off")


def test_an_unwritable_folder_is_said_once_and_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bar_hash_cache.configure(blocker / "hashes")  # its parent is a file: mkdir fails
    try:
        with caplog.at_level(logging.INFO, logger="core.bar_hash_cache"):
            for symbol in ("GOOG", "SP500"):
                bars = _bars(symbol)
                assert list(bars.hashes) == _truth(bars)
    finally:
        bar_hash_cache.configure("off")
    said = [r.getMessage() for r in caplog.records if r.name == "core.bar_hash_cache"]
    assert len(said) == 1 and "cannot write" in said[0]


def test_the_folder_is_trimmed_least_recently_used_first(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    list(_bars("GOOG").hashes)
    list(_bars("SP500").hashes)
    goog, sp500 = (
        next(p for p in _files(cache) if p.name.startswith(_key(s))) for s in ("GOOG", "SP500")
    )
    os.utime(sp500, (1, 1))  # SP500 used long ago; GOOG just now
    assert _bars("GOOG").hashes.from_disk()  # a hit refreshes the file's time
    monkeypatch.setattr(bar_hash_cache, "MAX_BYTES", goog.stat().st_size + _bytes_of("NASDAQ") + 1)
    list(_bars("NASDAQ").hashes)
    names = {p.name for p in _files(cache)}
    assert goog.name in names and sp500.name not in names and len(names) == 2


def _key(symbol: str) -> str:
    h = _bars(symbol).hashes
    return bar_hash_cache.cache_key(symbol, h._times, h._numeric, h._text)


def _bytes_of(symbol: str) -> int:
    return (len(_bars(symbol)) + 1) * bar_hash_cache.DIGEST_BYTES


def test_short_series_are_not_kept(cache: Path) -> None:
    bars = _bars()
    short = bars.hashes[: bar_hash_cache._MIN_BARS - 1]
    assert list(short) == _truth(bars)[: bar_hash_cache._MIN_BARS - 1]
    assert not cache.exists() or not _files(cache)


def test_a_new_way_of_hashing_is_a_new_key(monkeypatch: pytest.MonkeyPatch) -> None:
    h = _bars().hashes
    before = bar_hash_cache.cache_key("GOOG", h._times, h._numeric, h._text)
    monkeypatch.setattr(bar_hash_cache, "_scheme", b"another core/bars.py")
    assert bar_hash_cache.cache_key("GOOG", h._times, h._numeric, h._text) != before


_floats = st.floats(allow_nan=True, allow_infinity=True, width=64)


@settings(max_examples=200)
@given(
    n=st.integers(1, 6),
    data=st.data(),
    change=st.sampled_from(["time", "number", "text", "symbol", "name", "none_text"]),
)
def test_any_change_to_the_bars_is_another_key(n: int, data: st.DataObject, change: str) -> None:
    """Same content, same key; a change to one time, one number (one bit: -0.0 is not 0.0,
    NaN payloads count), one text value, the symbol or a field's name: another key."""
    times = np.array(data.draw(st.lists(st.integers(-(2**62), 2**62), min_size=n, max_size=n)))
    close = np.array(data.draw(st.lists(_floats, min_size=n, max_size=n)), dtype=np.float64)
    note = data.draw(st.lists(st.none() | st.text(max_size=5), min_size=n, max_size=n))
    k = data.draw(st.integers(0, n - 1))

    def key(t: np.ndarray, c: np.ndarray, txt: list[str | None], sym: str, name: str) -> str:
        return bar_hash_cache.cache_key(sym, t, {name: c}, {"note": txt})

    base = key(times, close, note, "S", "close")
    assert key(times.copy(), close.copy(), list(note), "S", "close") == base
    t, c, txt, sym, name = times.copy(), close.copy(), list(note), "S", "close"
    if change == "time":
        t[k] ^= 1
    elif change == "number":
        bits = c.view(np.uint64)
        bits[k] ^= np.uint64(1)
    elif change == "text":
        txt[k] = (txt[k] or "") + "x"
    elif change == "none_text":
        txt[k] = None if txt[k] is not None else ""
    elif change == "symbol":
        sym = "T"
    else:
        name = "open"
    assert key(t, c, txt, sym, name) != base


def test_slices_of_a_complete_series_have_their_hashes_without_hashing(
    cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A study reads a file once and runs its trials on windows of it: with the file's
    hashes known (from the cache), every window has its own at once."""
    truth = _truth(_bars())
    list(_bars().hashes)  # an earlier run: the file's hashes are on disk
    bars = _bars()
    assert bars.hashes.from_disk()

    def no_hashing(*_: object, **__: object) -> list[str]:
        raise AssertionError("hashed again")

    monkeypatch.setattr("feeds.csv.reader.bar_hashes", no_hashing)
    monkeypatch.setattr("feeds.csv.reader.bar_hash", no_hashing)
    n = len(truth)
    for window in (slice(0, n), slice(10, 900), slice(-300, None), slice(None, None, -7)):
        part = bars.hashes[window]
        assert part.from_disk()
        assert list(part) == truth[window]
    assert len(_files(cache)) == 1  # no file per window


def test_a_study_worker_takes_the_files_hashes_from_the_cache(cache: Path) -> None:
    from analyzers.config import FMELConfig
    from runtime.research.trial import Backtester, StudyJob

    list(_bars().hashes)
    bars = _bars()
    job = StudyJob(
        study_id="s",
        agent="agents.sma_cross:SmaCrossAgent",
        feeds=(CSVFeedConfig(path=DATA / "GOOG.csv", symbol="GOOG"),),
        fmel=FMELConfig(hash_cache_dir=str(cache)),
    )
    Backtester(job, {"GOOG": bars})
    assert len(bars.hashes._cache) == len(bars)


def test_a_column_changed_after_the_first_hash_does_not_reach_the_cache(cache: Path) -> None:
    """The key is the file's content: what the caller does to its CSVBars afterwards (a column
    added or replaced, a text value edited) changes neither the hashes nor what is kept."""
    truth = _truth(_bars())
    bars = _bars()
    bars.hashes[0]
    bars.numeric["close"] = bars.numeric["close"] * 1.0001
    bars.numeric["sma5"] = np.convolve(bars.numeric["close"], np.ones(5) / 5, "same")
    for col in bars.text.values():
        col[:] = ["x"] * len(col)
    assert list(bars.hashes) == truth
    assert list(_bars().hashes) == truth  # what the cache kept under the file's key


def test_the_hashing_code_is_taken_as_loaded_not_as_its_file_reads_now(tmp_path: Path) -> None:
    """The key's part for how bars are hashed: the compiled code this process runs. Editing
    the file afterwards changes nothing; other code is another key; it does not depend on the
    process (hash seeds, what else was imported)."""
    import importlib.util
    import subprocess
    import sys

    src = tmp_path / "hashing_mod.py"
    src.write_text("def h(x):\n    return {'a', 'b'} and x + 1.5\n")
    spec = importlib.util.spec_from_file_location("hashing_mod", src)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    before = bar_hash_cache._code_digest(mod)
    src.write_text("def h(x):\n    return x + 2.5\n")
    assert bar_hash_cache._code_digest(mod) == before
    exec(compile(src.read_text(), str(src), "exec"), vars(mod))
    assert bar_hash_cache._code_digest(mod) != before
    code = "from core import bar_hash_cache as b; print(b._scheme_digest().hex())"
    seen = {
        subprocess.run(
            [sys.executable, "-c", f"import {extra}; {code}"],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed, extra in ((1, "os"), (2, "numpy"), (3, "backtrader"))
    }
    assert len(seen) == 1


def test_only_its_own_stale_temporary_files_are_removed(cache: Path) -> None:
    """A writer killed between writing and renaming leaves a temporary file: removed by a
    later store once an hour old; anything else in the folder is left alone."""
    cache.mkdir(parents=True)
    ours = cache / f".{'0' * 32}-x1.tmp"
    fresh = cache / f".{'1' * 32}-x2.tmp"
    fresh.write_bytes(b"x")
    others = [cache / ".bash_history.tmp", cache / ".draft-1.tmp", cache / f".{'0' * 31}-y.tmp"]
    old = os.path.getmtime(cache) - 2 * bar_hash_cache.STALE_TMP_S
    for p in (ours, *others):
        p.write_bytes(b"x")
        os.utime(p, (old, old))
    list(_bars().hashes)
    assert not ours.exists() and fresh.exists() and all(p.exists() for p in others)


def test_an_index_that_is_not_a_whole_number_is_refused_as_a_list_refuses_it(
    cache: Path,
) -> None:
    list(_bars().hashes)
    for hashes in (_bars().hashes, _bars().hashes):  # before and after the cache is read
        with pytest.raises(TypeError):
            hashes[1.0]  # type: ignore[call-overload]
        hashes.from_disk()
    assert _bars().hashes[np.int64(3)] == _truth(_bars())[3]


@pytest.mark.parametrize("value", ["off", "OFF ", " off", "off/", "Off//"])
def test_off_in_any_case_or_with_a_slash_is_off(value: str) -> None:
    assert bar_hash_cache.configure(value) is None
