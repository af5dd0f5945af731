"""Rebuild ``data/enriched/GOOG.csv`` from the real ``data/GOOG.csv``.

The extra columns are derived from the real closes only, so the file stays real data plus
documented indicators; it exists to show dynamic fields (``rsi``), nested names
(``signals.momentum_20`` -> ``signals_momentum_20``) and text fields (``regime``):

* ``rsi``: Wilder's 14-bar RSI (Wilder, *New Concepts in Technical Trading Systems*, 1978),
  empty for the first 14 bars.
* ``signals.momentum_20``: 20-bar return of the close, in percent, empty for the first 20 bars.
* ``regime``: ``up`` when the close is above its 50-bar mean, else ``down`` (empty before).

Run: ``python data/enriched/make_enriched.py``.
"""

from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent


def main() -> None:
    df = pd.read_csv(HERE.parent / "GOOG.csv")
    df = df.rename(columns={df.columns[0]: "Date"})
    close = df["Close"]
    delta = close.diff()
    gain = delta.clip(lower=0).ewm(alpha=1 / 14, min_periods=14, adjust=False).mean()
    loss = (-delta.clip(upper=0)).ewm(alpha=1 / 14, min_periods=14, adjust=False).mean()
    df["rsi"] = (100 - 100 / (1 + gain / loss)).round(4)
    df["signals.momentum_20"] = (close.pct_change(20) * 100).round(4)
    mean50 = close.rolling(50).mean()
    df["regime"] = (close > mean50).map({True: "up", False: "down"}).where(mean50.notna(), "")
    df.to_csv(HERE / "GOOG.csv", index=False)


if __name__ == "__main__":
    main()
