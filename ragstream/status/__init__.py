"""Where everything stands: `ragstream status`.

Per consumer group (the three stages and the cost accountant): its state, its members (client
id, host) and the partitions each holds, lag per partition and in total, and records per
second. Then the dead-letter topic's depth, and per paid service its mode, circuit state and
throttle state with spend against budget.

Lag is what `kafka-consumer-groups --describe` computes: a partition's log-end offset minus
the group's committed offset. Where the group has no committed offset (it never committed on
that partition, or the partition is new) the whole log counts, from the log start, because
the group reads from the earliest offset; a committed offset below the log start (records
removed by retention) also counts from the log start. Records per second are committed
offsets advancing between two samples, over the time between them.

Modes and throttle states come from the compacted control topic, read whole (the latest
`ThrottleEvent` per service is the cost accountant's last word on spend); circuit states come
from the same topic, where every worker reports its breakers (see ragstream.providers.circuit_reports).
"""

from ragstream.status.model import (
    GroupSpec,
    GroupStatus,
    PartitionStatus,
    ServiceStatus,
    Status,
    advance_per_second,
    flow_groups,
    group_status,
    partition_lag,
    resolve_groups,
    service_statuses,
)
from ragstream.status.reader import Sample, StatusReader, read_status

__all__ = [
    "GroupSpec",
    "GroupStatus",
    "PartitionStatus",
    "Sample",
    "ServiceStatus",
    "Status",
    "StatusReader",
    "advance_per_second",
    "flow_groups",
    "group_status",
    "partition_lag",
    "read_status",
    "resolve_groups",
    "service_statuses",
]
