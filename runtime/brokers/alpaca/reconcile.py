"""The account at start: can it trade, what is open, what is held, is the market open.

:func:`read_start_state` runs once, on the main thread, before any worker thread exists. Any
doubt is an error (:class:`~core.errors.BrokerError`): a broker that cannot read the account
must not run on an imagined empty portfolio.

Alpaca behaviour relied on (docs.alpaca.markets, Trading API v2 "Account", "Orders", "Clock"):
the account's ``status`` is ``ACTIVE`` when it can trade; a cancel answered 422 means the order
already ended.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

from alpaca.trading.client import TradingClient
from alpaca.trading.models import Order as AlpacaOrder
from alpaca.trading.models import TradeAccount

from core.errors import BrokerError, TransientError
from runtime.brokers.alpaca import http
from runtime.brokers.alpaca.config import AlpacaBrokerConfig
from runtime.brokers.alpaca.http import AlpacaAPIError, AlpacaCaller
from runtime.brokers.alpaca.orders import alpaca_status, position_key, positions_of, to_decimal
from runtime.brokers.alpaca.state import MarketClock

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StartState:
    """The account as the run starts.

    Attributes:
        cash_usd, equity_usd: from the account (after any cancel at start).
        positions: position key -> (signed quantity, average entry price USD).
        to_adopt: open orders to follow as this run's (policy ``adopt``), else empty.
        clock: the market clock.
    """

    cash_usd: float
    equity_usd: float
    positions: dict[str, tuple[Decimal, float]]
    to_adopt: list[AlpacaOrder]
    clock: MarketClock


def read_start_state(
    caller: AlpacaCaller,
    client: TradingClient,
    config: AlpacaBrokerConfig,
    traded: Collection[str],
) -> StartState:
    """Check the account can trade, apply ``open_order_policy``, read positions and the clock.

    Args:
        caller: runs the calls (not interruptible: a start cannot be half done).
        client: a prepared client (main thread's).
        config: the policy and the endpoint.
        traded: position keys of this run's feeds (``AAPL``, ``BTCUSD``); empty = unknown.

    Returns:
        The account as the run starts.

    Raises:
        BrokerError: the account cannot be read or cannot trade; open orders found with policy
            ``halt``; an open order to adopt is for a symbol no feed trades; orders still open
            after cancelling them at start.
    """
    endpoint = config.endpoint

    def read(operation: str, fn: Callable[..., T], *args: Any) -> T:
        try:
            return caller.call(operation, fn, *args, interruptible=False)
        except (TransientError, AlpacaAPIError) as e:
            raise BrokerError(
                f"cannot read the Alpaca {operation.replace('_', ' ')} at {endpoint}: {e}; "
                "refusing to run on an unknown portfolio"
            ) from e

    account = read("account", http.get_account, client)
    _check_account(account)
    open_orders = read("open_orders", http.get_open_orders, client)
    to_adopt: list[AlpacaOrder] = []
    if open_orders:
        to_adopt = _apply_open_order_policy(open_orders, config, traded, caller, client)
        account = read("account", http.get_account, client)
    positions = positions_of(read("positions", http.get_positions, client))
    clock = read("clock", http.get_clock, client)
    state = StartState(
        cash_usd=float(to_decimal(account.cash)),
        equity_usd=float(to_decimal(account.equity)),
        positions=positions,
        to_adopt=to_adopt,
        clock=MarketClock.of(clock, time.monotonic()),
    )
    untraded = sorted(set(positions) - set(traded)) if traded else []
    logger.info(
        "Alpaca account %s: cash %.2f USD, equity %.2f USD, %d position(s)%s, %d "
        "open order(s) (%s), market %s",
        account.account_number,
        state.cash_usd,
        state.equity_usd,
        len(positions),
        f" ({', '.join(untraded)} not traded by this run)" if untraded else "",
        len(open_orders),
        config.open_order_policy,
        "open" if clock.is_open else "closed",
    )
    return state


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
    client: TradingClient,
) -> list[AlpacaOrder]:
    """``halt``: raise; ``adopt``: return the orders to follow; ``cancel``: cancel them and wait
    until Alpaca lists none of them (returns ``[]``)."""
    policy = config.open_order_policy
    listing = "; ".join(
        f"{o.symbol} {getattr(o.side, 'value', o.side)} {o.qty} "
        f"{getattr(o.type, 'value', o.type)} {alpaca_status(o)} id={o.id}"
        for o in orders[:10]
    )
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
    logger.warning("cancelling %d open order(s) found at start: %s", len(orders), listing)
    try:
        for o in orders:
            try:
                caller.call("cancel", http.cancel_order, client, str(o.id), interruptible=False)
            except AlpacaAPIError as e:  # 422: it ended meanwhile; the listing below checks
                logger.info("cancel of %s at start: %s", o.id, e.message)
        deadline = time.monotonic() + max(30.0, 5 * config.poll_interval_s)
        ids = {str(o.id) for o in orders}
        while True:
            listed = caller.call("open_orders", http.get_open_orders, client, interruptible=False)
            left = [o for o in listed if str(o.id) in ids]
            if not left:
                return []
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"{len(left)} open order(s) still open after cancelling at "
                    "start: " + ", ".join(str(o.id) for o in left)
                )
            time.sleep(min(0.5, config.poll_interval_s))
    except (TransientError, AlpacaAPIError) as e:
        raise BrokerError(
            f"cannot cancel the open orders at {config.endpoint}: {e}; "
            "refusing to run on an unknown portfolio"
        ) from e
