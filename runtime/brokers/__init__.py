"""Brokers an agent trades through: the pre-trade risk guard shared by every broker
(:mod:`runtime.brokers.risk`) and the Alpaca adapter (:mod:`runtime.brokers.alpaca`).

Nothing here imports the runtime root modules (config, runner, metrics): the runner builds the
brokers from their configs and wires their callbacks.
"""
