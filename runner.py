"""``python runner.py``: run one agent with the configuration in the environment.

See README.md (Configuration) for every setting; with nothing set it backtests the example
SMA-cross agent on the bundled real data and records every decision in ``fmel.duckdb``.
"""

import sys

from runtime.runner import main

if __name__ == "__main__":
    sys.exit(main())
