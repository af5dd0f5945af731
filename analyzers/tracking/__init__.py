"""Access tracking: which bar of which feed an agent's read returned, with the value it got.

Every line object an agent can hold is tracked where its value is read: the line buffers of the
data feeds, of every indicator and lines operation the agent created (``LineBuffer``,
``LineActions`` such as ``d.close > sma``, ``d.close(-1)``/``d.close(1)``, ``bt.And``/``bt.If``,
couplers, indicators of indicators), and the feeds' text fields. Each buffer's class is swapped
for a subclass whose ``__getitem__``, ``get``, ``getzero``, ``getzeroval`` and ``__len__`` also
report the read; identity, hashing and every backtrader internal keep working because the object
is the same. The tracker finds them through backtrader's own registry (every line object created
in the agent's ``__init__`` registers with its owner), so it does not matter where the agent keeps
them; labels come from where the agent keeps them (:func:`scan_labels`).

Who made the read: reads count only while the module flag :data:`ACTIVE` is true, i.e. while an
agent callback runs (``prenext``/``nextstart``/``next``/``notify_*``) and not inside a
backtrader call made on the agent's behalf (orders, ``order_target_*``, sizers, the broker's
``getvalue``...); :class:`~analyzers.fmel.FMELAnalyzer` sets the flag around those calls.

Hot path (main thread, per read): one tuple append ``(tag id, ago, size, bar index, value)``
(numbers and the value only, so the garbage collector soon stops tracking it), where
``bar index`` is the absolute position in the line's own buffer that was actually returned
(backtrader's buffer wraps around: ``close[-1]`` on the first bar of a preloaded feed returns the
LAST bar). Resolution (:meth:`AccessTracker.resolve`, once per bar) maps it to the bar of every
source feed the value comes from, with that bar's time and data hash, and flags look-ahead: a
source bar that is not in the past of the feed's current bar (a positive index, a wrapped-around
index, a feed that has not started, a forward-shifted line such as ``d.close(1)`` anywhere under
an indicator, an indicator that reads a future bar in its own code).

Deferred resolution: when every buffer resolution looks at only grows (:attr:`AccessTracker.
deferrable`: preloaded backtests, not strict mode), the bar loop only takes the feeds' positions
(:meth:`AccessTracker.capture`, a few ints per feed) and hands the raw reads over
(:mod:`analyzers.deferred`); :meth:`AccessTracker.resolve` with that ``state`` then gives, on
the writer thread, exactly what it would have given at the bar, and
:func:`~analyzers.tracking.columns.resolve_columns` gives the same for a whole batch of bars at
once, vectorised (the decision writer's path).

Thread context: tracking and wiring on the main (backtrader) thread only; :meth:`AccessTracker.
resolve` with a captured ``state`` on any thread, under :attr:`AccessTracker.resolve_lock`.
"""

from analyzers.tracking._build import drop_stale_extension

drop_stale_extension()  # before any module binds the compiled reads

from analyzers.tracking.labels import scan_labels  # noqa: E402
from analyzers.tracking.model import FeedInfo, LineTag, Read  # noqa: E402
from analyzers.tracking.proxies import set_active  # noqa: E402
from analyzers.tracking.tracker import AccessTracker  # noqa: E402

__all__ = ["AccessTracker", "FeedInfo", "LineTag", "Read", "scan_labels", "set_active"]
