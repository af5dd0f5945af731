"""Alpaca adapter on ``alpaca-py``, one module per role.

* :mod:`~runtime.brokers.alpaca.config`: :class:`AlpacaBrokerConfig` (settings, endpoints).
* :mod:`~runtime.brokers.alpaca.orders`: pure mapping between backtrader and Alpaca orders
  (requests, statuses, ids, quantities, fill increments); no I/O.
* :mod:`~runtime.brokers.alpaca.http`: client construction, error classification, retries.
* :mod:`~runtime.brokers.alpaca.events`: what the worker threads and the broker tell each other.
* :mod:`~runtime.brokers.alpaca.state`: order and account bookkeeping.
* :mod:`~runtime.brokers.alpaca.reconcile`: the account check at start (open orders, clock).
* :mod:`~runtime.brokers.alpaca.worker`: the threads (orders, monitor, stream).
* :mod:`~runtime.brokers.alpaca.broker`: :class:`AlpacaPaperTradingBroker`, the backtrader
  broker.

This package module imports nothing, so reading the config does not load ``alpaca-py``.
"""
