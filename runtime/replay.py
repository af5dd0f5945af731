"""``python -m runtime.replay``: replay CSV bars to a Pub/Sub topic (:mod:`feeds.replay`).

The entry point lives in the composition root because it reads the environment: the project
(``GOOGLE_CLOUD_PROJECT`` or its alternatives) and the emulator (``PUBSUB_EMULATOR_HOST``) come
from :func:`runtime.config.process_pubsub_target` and are handed to :func:`feeds.replay.main` as
the defaults of ``--project`` and ``--emulator-host``. Options: ``python -m runtime.replay -h``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from feeds import replay
from runtime.config import process_pubsub_target


def main(argv: Sequence[str] | None = None) -> int:
    """Run the replay CLI with the environment's project and emulator as defaults.

    Returns:
        The exit code of :func:`feeds.replay.main` (0 done, 1 publishing failed, 2 bad input).
    """
    project, emulator_host = process_pubsub_target()
    return replay.main(argv, project=project, emulator_host=emulator_host)


if __name__ == "__main__":
    sys.exit(main())
