"""The account at start: can it trade, what is open, what is held, is the market open.

:func:`read_start_state` runs once, on the main thread, before any worker thread exists. Any
doubt is an error (:class:`~core.errors.BrokerError`): a broker that cannot read the account
must not run on an imagined empty portfolio.

Open orders are found as families (an order with its bracket legs): the open listing, nested,
has every family whose root is still open; a bracket whose entry filled is left out of it, and
its held stop-loss leg out of every open listing (alpaca-trade-api-js #87,
alpaca-trade-api-python #322), so the closed listing of the last 90 days (Alpaca cancels a
``gtc`` order after 90 days), nested, is searched for filled entries with legs still working.
All three open-order policies see those legs.

Alpaca behaviour relied on (docs.alpaca.markets, Trading API v2 "Account", "Orders", "Clock"):
the account's ``status`` is ``ACTIVE`` when it can trade; a cancel answered 422 means the order
already ended; a cancel passes through ``pending_cancel``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar, cast

from alpaca.trading.models import Order as AlpacaOrder
from alpaca.trading.models import TradeAccount

from core.errors import BrokerError, RetryInterruptedError, TransientError
from runtime.brokers.alpaca import http
from runtime.brokers.alpaca.config import AlpacaBrokerConfig
from runtime.brokers.alpaca.http import AlpacaApi, AlpacaAPIError, AlpacaCaller
from runtime.brokers.alpaca.orders import alpaca_status, position_key, positions_of, to_decimal
from runtime.brokers.alpaca.state import DONE, MarketClock

logger = logging.getLogger(__name__)

T = TypeVar("T")

GTC_LIFETIME = timedelta(days=90)  # Alpaca cancels gtc orders 90 days after they were placed
MAX_CLOSED_PAGES = 20  # 10,000 closed orders searched for live legs at most


def live(o: AlpacaOrder) -> bool:
    """The order may still trade (``replaced`` lives on in its successor)."""
    return alpaca_status(o) not in DONE and alpaca_status(o) != "replaced"


def family_live(o: AlpacaOrder) -> bool:
    """The order or one of its legs may still trade."""
    return live(o) or any(live(leg) for leg in o.legs or ())


@dataclass(frozen=True, slots=True)
class StartState:
    """The account as the run starts.

    Attributes:
        cash_usd, equity_usd: from the account (after any cancel at start).
        positions: position key -> (signed quantity, average entry price USD).
        marks: position key -> Alpaca's current price, USD.
        to_adopt: open order families to follow as this run's (policy ``adopt``; a family's
            root may be a filled entry whose legs still work), else empty.
        clock: the market clock.
    """

    cash_usd: Decimal
    equity_usd: float
    positions: dict[str, tuple[Decimal, float]]
    marks: dict[str, float]
    to_adopt: list[AlpacaOrder]
    clock: MarketClock


def read_start_state(
    caller: AlpacaCaller,
    api: AlpacaApi,
    config: AlpacaBrokerConfig,
    traded: Collection[str],
) -> StartState:
    """Check the account can trade, apply ``open_order_policy`` to every open order family
    (bracket legs included), read positions and the clock.

    Args:
        caller: runs the calls (not interruptible: a start cannot be half done).
        api: the account's calls (main thread's).
        config: the policy and the endpoint.
        traded: position keys of this run's feeds (``AAPL``, ``BTCUSD``); empty = unknown.

    Returns:
        The account as the run starts.

    Raises:
        BrokerError: the account cannot be read or cannot trade; open orders found with policy
            ``halt``; an open order to adopt is for a symbol no feed trades; orders still open
            after cancelling them at start.
        RetryInterruptedError: the broker's stop event was set (a stop before the run
            started): no read begins after it, a retry wait ends at once.
    """
    endpoint = config.endpoint

    def read(operation: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            return start_call(caller, operation, fn, *args)
        except RetryInterruptedError:
            raise
        except (TransientError, AlpacaAPIError) as e:
            raise BrokerError(
                f"cannot read the Alpaca {operation.replace('_', ' ')} at {endpoint}: {e}; "
                "refusing to run on an unknown portfolio"
            ) from e

    account = read("account", api.account)
    _check_account(account)
    open_orders = find_open_families(caller, api, endpoint)
    to_adopt: list[AlpacaOrder] = []
    if open_orders:
        to_adopt = _apply_open_order_policy(open_orders, config, traded, caller, api)
        account = read("account", api.account)
    rows = read("positions", api.positions)
    positions = positions_of(rows)
    clock = read("clock", api.clock)
    state = StartState(
        cash_usd=to_decimal(account.cash),
        equity_usd=float(to_decimal(account.equity)),
        positions=positions,
        marks={
            position_key(str(p.symbol)): float(to_decimal(p.current_price))
            for p in rows
            if p.current_price is not None
        },
        to_adopt=to_adopt,
        clock=MarketClock.of(clock, time.monotonic()),
    )
    untraded = sorted(set(positions) - set(traded)) if traded else []
    logger.info(
        "Alpaca account %s (%s API): cash %.2f USD, equity %.2f USD, %d position(s)%s, %d "
        "open order famil(ies) (%s), market %s",
        account.account_number,
        api.name,
        state.cash_usd,
        state.equity_usd,
        len(positions),
        f" ({', '.join(untraded)} not traded by this run)" if untraded else "",
        len(open_orders),
        config.open_order_policy,
        "open" if clock.is_open else "closed",
    )
    return state


def start_call(caller: AlpacaCaller, operation: str, fn: Callable[..., T], *args: Any) -> T:
    """``caller.call`` for the reads and cancels at start: none begins once the caller's stop
    event is set (:meth:`AlpacaPaperTradingBroker.interrupt_connect
    <runtime.brokers.alpaca.broker.AlpacaPaperTradingBroker.interrupt_connect>`: a stop before
    the run started), and the stop ends the wait for one in flight at once (the call goes on
    on a daemon thread, left behind: these are reads, and cancels the next start checks).
    Before, a SIGTERM with Alpaca stalled waited out every retry of every read, 49-60 s
    (helper-84 F6), and an Alpaca trickling its answer a byte at a time held it for good: a
    request's timeout is per read of the socket (helper-86 F1).

    Raises:
        RetryInterruptedError: stopping. Otherwise what ``caller.call`` raises.
    """
    stop = caller.stop
    if stop.is_set():
        raise RetryInterruptedError(f"{operation}: stopping before the run started; not sent")
    box: list[tuple[bool, Any]] = []
    done = threading.Event()

    def run() -> None:
        try:
            box.append((True, caller.call(operation, fn, *args, interruptible=True)))
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            box.append((False, e))
        done.set()

    threading.Thread(target=run, name=f"alpaca-start-{operation}", daemon=True).start()
    while not done.wait(0.05):
        if stop.is_set():
            raise RetryInterruptedError(f"{operation}: stopping before the run started")
    ok, value = box[0]
    if ok:
        return cast(T, value)
    raise value


def find_open_families(caller: AlpacaCaller, api: AlpacaApi, endpoint: str) -> list[AlpacaOrder]:
    """Every order family with something still working: open roots (legs nested) and filled
    entries whose legs still work (the held stop legs no open listing shows).

    Raises:
        BrokerError: a listing cannot be read.
    """
    try:
        families = start_call(caller, "open_orders", http.open_families, api)
        closed, complete = start_call(
            caller,
            "closed_orders",
            http.closed_families,
            api,
            datetime.now(UTC) - GTC_LIFETIME,
            MAX_CLOSED_PAGES,
        )
    except RetryInterruptedError:
        raise
    except (TransientError, AlpacaAPIError) as e:
        raise BrokerError(
            f"cannot read the Alpaca open orders at {endpoint}: {e}; "
            "refusing to run on an unknown portfolio"
        ) from e
    if not complete:
        logger.warning(
            "more than %d closed orders in the last 90 days: bracket legs of older entries "
            "were not searched",
            MAX_CLOSED_PAGES * http.LIST_LIMIT,
        )
    seen = {str(o.id) for o in families}
    with_legs = [o for o in closed if o.legs and family_live(o) and str(o.id) not in seen]
    return [*families, *with_legs]


def describe(o: AlpacaOrder) -> str:
    """One family in a log line: the root, then its working legs."""
    legs = [leg for leg in o.legs or () if live(leg)]
    text = (
        f"{o.symbol} {getattr(o.side, 'value', o.side)} {o.qty} "
        f"{getattr(o.type, 'value', o.type)} {alpaca_status(o)} id={o.id}"
    )
    if legs:
        text += (
            " legs["
            + ", ".join(
                f"{getattr(leg.type, 'value', leg.type)} {alpaca_status(leg)} id={leg.id}"
                for leg in legs
            )
            + "]"
        )
    return text


def _check_account(account: TradeAccount) -> None:
    status = str(getattr(account.status, "value", account.status))
    if (
        status != "ACTIVE"
        or account.trading_blocked
        or account.account_blocked
        or account.trade_suspended_by_user
    ):
        raise BrokerError(
            f"Alpaca account {account.account_number} cannot trade (status "
            f"{status}, trading_blocked={account.trading_blocked}, "
            f"account_blocked={account.account_blocked})"
        )


def _apply_open_order_policy(
    orders: list[AlpacaOrder],
    config: AlpacaBrokerConfig,
    traded: Collection[str],
    caller: AlpacaCaller,
    api: AlpacaApi,
) -> list[AlpacaOrder]:
    """``halt``: raise; ``adopt``: return the families to follow; ``cancel``: cancel every
    working order of them and wait until Alpaca shows each one ended (returns ``[]``)."""
    policy = config.open_order_policy
    listing = "; ".join(describe(o) for o in orders[:10])
    if policy == "halt":
        raise BrokerError(
            f"the Alpaca account has {len(orders)} open order(s) ({listing}). "
            "ALPACA_OPEN_ORDER_POLICY=halt stops here: cancel them, or set "
            "ALPACA_OPEN_ORDER_POLICY=cancel (cancel at start) or adopt (track them as "
            "this run's orders)"
        )
    if policy == "adopt":
        missing = sorted(
            {str(o.symbol) for o in orders if position_key(str(o.symbol)) not in traded}
        )
        if missing:
            raise BrokerError(
                f"cannot adopt open orders for {', '.join(missing)}: no feed of "
                "this run trades them; cancel them or add the symbols"
            )
        logger.warning("adopting %d open order(s): %s", len(orders), listing)
        return list(orders)
    logger.warning("cancelling %d open order famil(ies) found at start: %s", len(orders), listing)
    try:
        for o in orders:
            targets = [o] if live(o) else [leg for leg in o.legs or () if live(leg)]
            for t in targets:
                try:
                    start_call(caller, "cancel", api.cancel, str(t.id))
                except AlpacaAPIError as e:  # 422: it ended meanwhile; checked below
                    logger.info("cancel of %s at start: %s", t.id, e.message)
        deadline = time.monotonic() + max(30.0, 5 * config.poll_interval_s)
        left = list(orders)
        while True:
            left = [
                snap
                for o in left
                if family_live(snap := start_call(caller, "order", api.order, str(o.id)))
            ]
            if not left:
                return []
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"{len(left)} open order famil(ies) still open after cancelling at "
                    "start (pending_cancel?): " + "; ".join(describe(o) for o in left)
                )
            if caller.stop.wait(min(0.5, config.poll_interval_s)):
                raise RetryInterruptedError("cancelling at start: stopping")
    except RetryInterruptedError:
        raise
    except (TransientError, AlpacaAPIError) as e:
        raise BrokerError(
            f"cannot cancel the open orders at {config.endpoint}: {e}; "
            "refusing to run on an unknown portfolio"
        ) from e
