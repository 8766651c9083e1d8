"""Consumer lag of the stack's groups: how much of what was written has not been processed yet.

A stage commits an offset only once what it read up to there is finished (warnings acknowledged,
rows in PostgreSQL), so "committed = end offset" on every partition a group reads means that group
has nothing in hand. ``crisiswatch up`` uses it to drain the pipeline before it stops (what the API
acknowledged reaches PostgreSQL before the in-memory broker goes), the chaos tests to know when a
scenario has settled, the soak command to report lag over time.

The embedded broker can list an end offset short of a partition's last record batch (README, known
limits); with the stack's one-record batches it is exact for the worker's writes, and off by at most
one batch for the others — callers that need certainty also read the topic.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from pipeline import topics

Position = tuple[str, int]

WORKER_GROUP: Final = "crisiswatch"  # Faust's consumer group is the app id (pipeline.app.APP_ID)
SINK_GROUP: Final = "crisiswatch-sink"
ROUTER_GROUP: Final = "crisiswatch-router"

STACK_GROUPS: Final[Mapping[str, tuple[str, ...]]] = {
    WORKER_GROUP: (topics.CHECKINS, topics.CRISIS_EVENTS),
    SINK_GROUP: (topics.CHECKINS, topics.CITIZENS, topics.CRISIS_EVENTS, topics.WARNINGS, topics.ACKS, topics.CASES,
                 topics.CRISIS_STATUS),
    ROUTER_GROUP: (topics.WARNINGS,),
}
"""The consumer groups of ``crisiswatch up`` and the topics each one reads."""


def committed_offsets(bootstrap: str, group: str, client_options: Mapping[str, Any] | None = None) -> dict[Position, int]:
    """The offsets ``group`` committed, per topic and partition."""
    from kafka.admin import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="crisiswatch-lag", request_timeout_ms=10_000,
                             **(client_options or {}))
    try:
        offsets = admin.list_group_offsets({group: None}).get(group, {})
        return {(tp.topic, tp.partition): int(meta.offset) for tp, meta in offsets.items()
                if meta.offset is not None and meta.offset >= 0}
    finally:
        admin.close()


def end_offsets(bootstrap: str, names: Iterable[str], client_options: Mapping[str, Any] | None = None) -> dict[Position, int]:
    """The end offset of every partition of ``names`` (topics that do not exist have none)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                             client_id="crisiswatch-lag", **(client_options or {}))
    try:
        tps = [TopicPartition(t, p) for t in sorted(set(names)) for p in sorted(consumer.partitions_for_topic(t) or ())]
        return {(tp.topic, tp.partition): int(o) for tp, o in consumer.end_offsets(tps).items()} if tps else {}
    finally:
        consumer.close()


def group_lags(bootstrap: str, groups: Mapping[str, Iterable[str]] = STACK_GROUPS,
               client_options: Mapping[str, Any] | None = None) -> dict[str, int]:
    """Messages not yet committed, per group, summed over the partitions of the topics it reads."""
    wanted = {group: tuple(names) for group, names in groups.items()}
    ends = end_offsets(bootstrap, {t for names in wanted.values() for t in names}, client_options)
    out: dict[str, int] = {}
    for group, names in wanted.items():
        done = committed_offsets(bootstrap, group, client_options)
        out[group] = sum(max(0, end - done.get(tp, 0)) for tp, end in ends.items() if tp[0] in names)
    return out
