"""``python runner.py``: run one agent with the configuration in the environment.

See README.md (Configuration) for every setting; with nothing set it backtests the example
SMA-cross agent on the bundled real data and records every decision in ``fmel.duckdb``.
"""

import sys

if __name__ == "__main__":  # before the heavy imports (seconds): a signal then is held, not fatal
    from core.held_signals import hold_early

    hold_early()

from runtime.runner import main

if __name__ == "__main__":
    from core.held_signals import ignore_for_exit

    try:
        code = main()
    finally:
        ignore_for_exit()  # the outcome is printed: a signal must not change the exit code
    sys.exit(code)
