"""A worker's Prometheus metrics, on a registry of its own.

Nothing is registered at import time: each `Metrics()` builds its metrics on an explicit
`CollectorRegistry`, so tests and several workers in one process never collide. The consumer
runtime calls the methods; `ragstream.health.HealthServer` serves `exposition()` at /metrics.

    worker.py       `Metrics`: every series below, and the methods that move them
    labels.py       the bounded label values (outcomes, states) and the histogram buckets
    lag.py          `observe_lag`: a consumer's lag per partition, read after a commit
    exposition.py   the text format served at /metrics

    ragstream_records_total{stage,outcome}                        counter
    ragstream_stage_duration_seconds{stage}                        histogram
    ragstream_upload_to_embedded_seconds                           histogram
    ragstream_inflight_records{stage}                              gauge
    ragstream_consumer_lag{stage,topic,partition}                  gauge
    ragstream_retries_total{stage,error_class}                     counter
    ragstream_dead_letters_total{stage,error_class}                counter
    ragstream_external_calls_total{service,operation,status}       counter
    ragstream_external_call_duration_seconds{service,operation}    histogram
    ragstream_circuit_state{service}                               gauge  0 closed, 1 half-open, 2 open
    ragstream_usage_units_total{service,unit}                      counter
    ragstream_spend_usd_total{service}                             counter
    ragstream_throttle_state{service}                              gauge  0 open, 1 warning, 2 throttled
    ragstream_budget_usd{service,window}                           gauge
    ragstream_budget_spent_usd{service,window}                     gauge
    ragstream_assigned_partitions{stage}                           gauge
    ragstream_worker_up{stage}                                     gauge  1 while a group member
    ragstream_batch_records{stage}                                 histogram  records per micro-batch
    ragstream_build_info{version}                                  gauge  always 1

plus the `process_*` and `python_info` series of prometheus_client's own collectors.

Every label is bounded: stages (3), outcomes (`labels.OUTCOMES`), exception
class names, services, operations, units, budget windows, and topic/partition (bounded by the
topology). Never a document, tenant or correlation id.
"""

from ragstream.metrics.exposition import CONTENT_TYPE
from ragstream.metrics.lag import observe_lag
from ragstream.metrics.worker import Metrics

__all__ = ["CONTENT_TYPE", "Metrics", "observe_lag"]
