"""Research: parameter optimisation and walk-forward (``MODE=optimize``).

===============  ==================================================================================
module           holds
===============  ==================================================================================
``config``       ``OptimizeConfig``: the ``OPTIMIZE_*``, ``WALK_FORWARD``, ``RAY_ADDRESS`` settings
``space``        the search space, the grid, Optuna's samplers (``Search``: ask/tell)
``folds``        walk-forward windows (``Fold``, ``make_folds``)
``trial``        one backtest of one set of params over one fold, scored (``Backtester``)
``engine``       where trials run: this process, a process pool, a Ray cluster
``store``        the ``trials`` and ``folds`` tables (DuckDB or BigQuery), streamed
``study``        the driver loop: hand out trials, store results, decide folds
``progress``     the progress bar / log lines
``cli``          ``MODE=optimize``: compose, run, report (called by ``runtime.runner.main``)
===============  ==================================================================================

This package never imports ``runtime.config`` (which imports ``runtime.research.config``).
"""
