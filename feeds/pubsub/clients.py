"""Pub/Sub clients and resource names: the subscriber and publisher clients (emulator-aware),
resource paths, subscription ids and the ``symbol`` filter.

Channels to an emulator get the options Google's own transport uses for Pub/Sub
(``google.pubsub_v1...transports.grpc``: no gRPC message size limit). The size that matters is
Pub/Sub's publish limit, 10,000,000 bytes per message (google-cloud-pubsub's
``_SERVER_PUBLISH_MAX_BYTES``), and it is applied per message, by the handler
(:attr:`~feeds.pubsub.config.StreamSettings.max_message_bytes`: a larger one is refused as
``oversized``, acknowledged and logged). It cannot be a channel limit: a Pull response carries
whole messages, several of them, and one message at the limit plus its envelope is already over
10 MB; gRPC refuses a response over its receive limit as a failed call, and the next Pull gets
the same messages again, so any cap (gRPC's default is 4 MB) would stall the subscription for
good (``tests/integration/test_pubsub_faults.py`` shows a 10 MB cap doing so).

The google-cloud-pubsub imports are deferred to the calls, so importing this module is cheap.
Clients are built here and owned by whoever asked for them (the subscriber, the replay tool).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "CHANNEL_OPTIONS",
    "MAX_BATCH_BYTES",
    "MAX_BATCH_MESSAGES",
    "MAX_FILTER_BYTES",
    "OrderedPublisher",
    "publisher_client",
    "resource_path",
    "subscriber_client",
    "subscription_id",
    "symbol_filter",
]

# Pub/Sub refuses filters longer than this (bytes).
MAX_FILTER_BYTES = 256
_SUB_ID_RE = re.compile(r"[^A-Za-z0-9\-_.~+%]+")
# What google-cloud-pubsub's generated gRPC transports pass when they create their channel.
CHANNEL_OPTIONS = (
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
)


def subscriber_client(emulator_host: str | None) -> Any:
    """A SubscriberClient; for an emulator host, on a plain-text channel without credentials
    (what the client itself does when PUBSUB_EMULATOR_HOST is set)."""
    from google.cloud.pubsub_v1 import SubscriberClient

    if emulator_host:
        import grpc
        from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

        channel = grpc.insecure_channel(emulator_host, options=CHANNEL_OPTIONS)
        return SubscriberClient(transport=SubscriberGrpcTransport(channel=channel))
    return _with_credentials(SubscriberClient)


def publisher_client(emulator_host: str | None, *, ordering: bool = True) -> Any:
    """A PublisherClient with message ordering (``ordering_key=symbol`` keeps each symbol's bars
    in order); plain-text channel for an emulator host."""
    from google.cloud.pubsub_v1 import PublisherClient
    from google.cloud.pubsub_v1 import types as pubsub_types

    options = pubsub_types.PublisherOptions(enable_message_ordering=ordering)
    if emulator_host:
        import grpc
        from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

        channel = grpc.insecure_channel(emulator_host, options=CHANNEL_OPTIONS)
        return PublisherClient(
            publisher_options=options, transport=PublisherGrpcTransport(channel=channel)
        )
    return _with_credentials(PublisherClient, publisher_options=options)


def _with_credentials(client_cls: Any, **kwargs: Any) -> Any:
    """A client on Application Default Credentials; none found is a configuration error at
    start, naming what to set (was an uncaught ``DefaultCredentialsError``, exit 1: a
    fresh-context attack with ``PUBSUB_EMULATOR_HOST=`` empty, which reads as unset).

    Raises:
        ConfigError: no usable credentials (``google.auth`` found none).
    """
    from google.auth.exceptions import DefaultCredentialsError

    from core.errors import ConfigError

    try:
        return client_cls(**kwargs)
    except DefaultCredentialsError as e:
        raise ConfigError(
            f"Pub/Sub: no Application Default Credentials ({str(e).splitlines()[0][:160]}); "
            "set PUBSUB_EMULATOR_HOST=host:port for the emulator, or GOOGLE_APPLICATION_"
            "CREDENTIALS / `gcloud auth application-default login` for Google Cloud"
        ) from e


# One Publish request carries at most 1,000 messages and 10 MB
# (https://cloud.google.com/pubsub/quotas#resource_limits); we stay a little below in bytes.
MAX_BATCH_MESSAGES = 1000
MAX_BATCH_BYTES = 9_000_000


class OrderedPublisher:
    """Publishes messages in order without ordering keys: each :meth:`publish_batch` is one
    synchronous Publish request (the generated ``google.pubsub_v1.PublisherClient``), so the
    server receives batch after batch in the order given. (The batching ``PublisherClient``
    sends several batches at once, which reorders them unless an ordering key serialises them;
    live bars go without ordering keys, see docs/pubsub.md.)

    Args:
        emulator_host: ``host:port`` of an emulator (plain-text channel), or None for Google.
        timeout_s: deadline of one request, seconds.

    Thread context: one thread at a time.
    """

    def __init__(self, emulator_host: str | None, *, timeout_s: float = 60.0) -> None:
        from google.pubsub_v1 import PublisherClient as GapicPublisher

        self.timeout_s = timeout_s
        if emulator_host:
            import grpc
            from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport

            channel = grpc.insecure_channel(emulator_host, options=CHANNEL_OPTIONS)
            self.client = GapicPublisher(transport=PublisherGrpcTransport(channel=channel))
        else:
            self.client = GapicPublisher()

    def publish_batch(
        self, topic_path: str, messages: Sequence[tuple[bytes, Mapping[str, str]]]
    ) -> list[str]:
        """Publish ``(body, attributes)`` pairs as one request (at most
        :data:`MAX_BATCH_MESSAGES` and :data:`MAX_BATCH_BYTES`). Returns the message ids.

        Raises:
            google.api_core.exceptions.GoogleAPICallError: the request failed (no retry here;
                a request whose answer was lost may have been published: the feed drops the
                copies).
        """
        response = self.client.publish(
            request={
                "topic": topic_path,
                "messages": [{"data": body, "attributes": dict(a)} for body, a in messages],
            },
            retry=None,
            timeout=self.timeout_s,
        )
        return list(response.message_ids)

    def create_topic(self, request: Mapping[str, Any]) -> Any:
        return self.client.create_topic(request=dict(request), timeout=self.timeout_s)

    def stop(self) -> None:
        """Close the channel. Idempotent."""
        self.client.transport.close()


def resource_path(project: str | None, kind: str, name: str) -> str:
    """``projects/<project>/<kind>/<name>``; ``name`` unchanged when it is already a path.

    Args:
        project: GCP project id (unused, and may be ``None``, for a full path).
        kind: ``"topics"`` or ``"subscriptions"``.
        name: a short id or ``projects/...`` path.
    """
    return name if name.startswith("projects/") else f"projects/{project}/{kind}/{name}"


def symbol_filter(symbols: Sequence[str]) -> str | None:
    """A Pub/Sub subscription filter on the ``symbol`` attribute, or None when it would exceed
    Pub/Sub's 256-byte limit (routing happens in our code regardless)."""
    if any('"' in s or "\\" in s for s in symbols):
        return None
    text = " OR ".join(f'attributes.symbol = "{s}"' for s in symbols)
    return text if len(text.encode()) <= MAX_FILTER_BYTES else None


def subscription_id(prefix: str, deployment: str, topic_id: str, many: bool) -> str:
    """``<prefix>-<deployment>[-<topic>]``, made legal (letters first, 3..255 characters, not
    ``goog...``); a name that had to be changed or cut ends with ``-`` and 8 hex digits of the
    raw name's SHA-256, so different inputs never share a subscription. The same inputs always
    give the same id: a restarted runner reuses it."""
    raw = f"{prefix}-{deployment}" + (f"-{topic_id}" if many else "")
    name = _SUB_ID_RE.sub("-", raw).strip("-")
    if not name or not name[0].isalpha() or name.lower().startswith("goog"):
        name = "s-" + name
    if name != raw or len(name) > 255:
        # Made legal, so two deployments could meet on one name ("desk/a", "desk a" and
        # "desk-a"; or two long ones cut at 255) and share one subscription, each getting
        # part of the bars (a fresh-context attack): a digest of the raw name keeps them apart.
        digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
        name = f"{name[: 255 - 9]}-{digest}"
    return name.ljust(3, "x")
