-- ragstream store, version 3: the cost ledger and budgets set at runtime.
--
-- One row per paid call, keyed by the CostUsage event's id: a usage event delivered twice (a
-- redelivery after a crash, a replay of the usage topic) is written once and counted once.
-- Windows are read by `occurred_at`, the time of the call, so a late event still counts in the
-- window it belongs to.

CREATE TABLE cost_ledger (
    event_id        uuid PRIMARY KEY,
    occurred_at     timestamptz NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    service         text NOT NULL,
    operation       text NOT NULL,
    model           text,
    unit            text NOT NULL,
    units           bigint NOT NULL CHECK (units >= 0),
    unit_price_usd  numeric(18, 9) NOT NULL CHECK (unit_price_usd >= 0),
    cost_usd        numeric(18, 9) NOT NULL CHECK (cost_usd >= 0),
    tenant_id       text,
    document_ids    text[] NOT NULL DEFAULT '{}',
    stage           text,
    correlation_id  text,
    request_id      text
);

CREATE INDEX cost_ledger_service_time ON cost_ledger (service, occurred_at);
CREATE INDEX cost_ledger_tenant_time ON cost_ledger (tenant_id, occurred_at);

-- Budgets an operator set with `ragstream cost budget`; they take precedence over the config.
-- tenant_id '' is the service-wide budget. NULL keeps the configured value.
CREATE TABLE cost_budgets (
    service          text NOT NULL,
    tenant_id        text NOT NULL DEFAULT '',
    daily_usd        numeric(18, 9) CHECK (daily_usd >= 0),
    hourly_requests  integer CHECK (hourly_requests >= 0),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (service, tenant_id)
);
