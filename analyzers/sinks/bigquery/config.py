"""Configuration of the BigQuery decision sink."""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.errors import ConfigError
from core.settings import setting


@dataclass(frozen=True, slots=True, kw_only=True)
class BigQuerySinkConfig:
    """BigQuery decision sink. ``api_endpoint`` is set from ``BIGQUERY_EMULATOR_HOST`` (with
    scheme) for the emulator; ``None`` uses Google's endpoint with Application Default
    Credentials.

    Attributes:
        project: GCP project of the dataset (``GOOGLE_CLOUD_PROJECT``, given by the loader).
        dataset: dataset of the table (letters, digits, ``_``).
        table: table of decision records (letters, digits, ``_``).
        location: dataset location (``US``, ``EU``); ``None``: BigQuery's default.
        api_endpoint: emulator endpoint with scheme, or ``None`` for Google's.
        timeout_s: timeout of one BigQuery request, seconds.
        decisions_topic: optional Pub/Sub topic (name or ``projects/<p>/topics/<t>``) that also
            receives every written row.
    """

    project: str
    dataset: str = setting("fmel", env="FMEL_DATASET", help="BigQuery dataset of decision records")
    table: str = setting("decisions", env="FMEL_TABLE", help="BigQuery table of decision records")
    location: str | None = setting(
        None, env="FMEL_BQ_LOCATION", help="BigQuery dataset location, e.g. US or EU"
    )
    api_endpoint: str | None = None
    timeout_s: float = setting(
        30.0, env="FMEL_BQ_TIMEOUT_S", help="timeout of one BigQuery request, seconds", gt=0
    )
    decisions_topic: str | None = setting(
        None,
        env="FMEL_PUBSUB_TOPIC",
        help="optional Pub/Sub topic that also receives every decision",
    )

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_]+", self.dataset):
            raise ConfigError(f"FMEL_DATASET must be letters, digits, _; got {self.dataset!r}")
        if not re.fullmatch(r"[A-Za-z0-9_]+", self.table):
            raise ConfigError(f"FMEL_TABLE must be letters, digits, _; got {self.table!r}")
        if self.timeout_s <= 0:
            raise ConfigError(f"FMEL_BQ_TIMEOUT_S must be > 0, got {self.timeout_s}")

    @property
    def table_id(self) -> str:
        """``project.dataset.table``."""
        return f"{self.project}.{self.dataset}.{self.table}"
