-- ragstream store, version 2: the dead-letter records an operator has sent back.
--
-- `ragstream dlq redrive` inserts one row per DLQ record once the broker has acknowledged its
-- copy on the original topic (ON CONFLICT DO NOTHING), and never sends a record that has a row:
-- a redrive run after another sends nothing twice. Keyed by the DLQ record's position; Kafka
-- never reuses an offset of a topic (deleting and re-creating the DLQ topic would: clear its rows
-- then). The other columns say where the copy went and why the record had failed.

CREATE TABLE dlq_redrives (
    dlq_topic        text NOT NULL,
    dlq_partition    integer NOT NULL CHECK (dlq_partition >= 0),
    dlq_offset       bigint NOT NULL CHECK (dlq_offset >= 0),
    target_topic     text NOT NULL,
    target_partition integer NOT NULL,
    target_offset    bigint NOT NULL,
    stage            text,
    error_class      text,
    document_id      text,
    tenant_id        text,
    redriven_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset)
);
