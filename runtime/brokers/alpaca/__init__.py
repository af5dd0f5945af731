"""Alpaca adapter on ``alpaca-py``, one module per role.

* :mod:`~runtime.brokers.alpaca.config`: :class:`AlpacaBrokerConfig` (settings, endpoints).
* :mod:`~runtime.brokers.alpaca.orders`: pure mapping between backtrader and Alpaca orders
  (requests, statuses, ids, quantities, fill increments); no I/O.
* :mod:`~runtime.brokers.alpaca.http`: the account's calls on the Trading API or the Broker API
  (``ALPACA_ACCOUNT_ID``), error classification, retries (waiting out Alpaca's rate limit).
* :mod:`~runtime.brokers.alpaca.events`: what the worker threads and the broker tell each other.
* :mod:`~runtime.brokers.alpaca.state`: order families, order and account bookkeeping (the
  ledger that keeps cash, positions and value of one moment).
* :mod:`~runtime.brokers.alpaca.reconcile`: the account check at start (open order families,
  held bracket legs included, the clock).
* :mod:`~runtime.brokers.alpaca.worker`: the threads (orders, monitor, trade-updates stream).
* :mod:`~runtime.brokers.alpaca.broker`: :class:`AlpacaPaperTradingBroker`, the backtrader
  broker.

This package module imports nothing, so reading the config does not load ``alpaca-py``.
"""
