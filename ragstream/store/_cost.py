"""The cost ledger and runtime budgets (tables `cost_ledger`, `cost_budgets`, migration 0003).

The cost accountant writes one row per CostUsage event, keyed by its id (a duplicate delivery
is written once), and reads spend and request counts per service and tenant over its windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from ragstream.events import CostUsage
from ragstream.store._base import OnConnection, atomic
from ragstream.store._errors import translate_errors

_SEP = "\x1f"  # unnest cannot take a ragged text[][]: each row's documents travel joined

_INSERT = """
INSERT INTO cost_ledger (event_id, occurred_at, service, operation, model, unit, units,
                         unit_price_usd, cost_usd, tenant_id, document_ids, stage,
                         correlation_id, request_id)
SELECT u.event_id, u.occurred_at, u.service, u.operation, u.model, u.unit, u.units,
       u.unit_price_usd, u.cost_usd, u.tenant_id,
       coalesce(string_to_array(nullif(u.documents, ''), E'\\x1f'), '{}'),
       u.stage, u.correlation_id, u.request_id
FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::text[], $5::text[], $6::text[],
            $7::bigint[], $8::numeric[], $9::numeric[], $10::text[], $11::text[], $12::text[],
            $13::text[], $14::text[])
     AS u(event_id, occurred_at, service, operation, model, unit, units, unit_price_usd,
          cost_usd, tenant_id, documents, stage, correlation_id, request_id)
ON CONFLICT (event_id) DO NOTHING
RETURNING event_id
"""

# Service-wide rows (GROUPING(tenant_id) = 1) and per-tenant rows, over the day window, with
# the part of it inside the hour window.
_WINDOWS = """
SELECT service,
       tenant_id,
       GROUPING(tenant_id) = 1 AS all_tenants,
       coalesce(sum(cost_usd), 0) AS spent_day,
       count(*) AS requests_day,
       coalesce(sum(cost_usd) FILTER (WHERE occurred_at >= $2), 0) AS spent_hour,
       count(*) FILTER (WHERE occurred_at >= $2) AS requests_hour
FROM cost_ledger
WHERE occurred_at >= least($1::timestamptz, $2::timestamptz)
GROUP BY GROUPING SETS ((service), (service, tenant_id))
"""


@dataclass(frozen=True, slots=True)
class WindowUsage:
    """Spend and requests of one service (tenant None: all tenants) in the current windows."""

    service: str
    tenant_id: str | None
    spent_day: Decimal
    requests_day: int
    spent_hour: Decimal
    requests_hour: int


@dataclass(frozen=True, slots=True)
class BudgetOverride:
    service: str
    tenant_id: str | None
    daily_usd: Decimal | None
    hourly_requests: int | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class SpendRow:
    day: datetime
    service: str
    tenant_id: str | None
    requests: int
    units: int
    unit: str
    cost_usd: Decimal


class CostOperations(OnConnection):
    """The ledger, its window sums and the budgets operators set at runtime."""

    @translate_errors
    async def record_usage(self, events: Sequence[CostUsage]) -> list[CostUsage]:
        """Write the events not yet in the ledger; those newly written (a duplicate is not)."""
        if not events:
            return []
        async with self._conn() as conn:
            rows = await conn.fetch(
                _INSERT,
                [e.event_id for e in events],
                [e.occurred_at for e in events],
                [e.service for e in events],
                [e.operation for e in events],
                [e.model for e in events],
                [e.unit for e in events],
                [e.units for e in events],
                [e.unit_price_usd for e in events],
                [e.cost_usd for e in events],
                [e.tenant_id for e in events],
                [_SEP.join(e.document_ids) for e in events],
                [e.stage for e in events],
                [e.correlation_id for e in events],
                [e.request_id for e in events],
            )
        fresh = {r["event_id"] for r in rows}
        return [e for e in events if e.event_id in fresh]

    @translate_errors
    async def window_usage(self, day_start: datetime, hour_start: datetime) -> list[WindowUsage]:
        """Spend and requests since `day_start` (and since `hour_start`), per service and per
        (service, tenant)."""
        async with self._conn() as conn:
            rows = await conn.fetch(_WINDOWS, day_start, hour_start)
        return [
            WindowUsage(
                service=r["service"],
                tenant_id=None if r["all_tenants"] else r["tenant_id"],
                spent_day=r["spent_day"],
                requests_day=r["requests_day"],
                spent_hour=r["spent_hour"],
                requests_hour=r["requests_hour"],
            )
            for r in rows
            if r["all_tenants"] or r["tenant_id"] is not None
        ]

    @translate_errors
    async def budget_overrides(self) -> list[BudgetOverride]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT service, tenant_id, daily_usd, hourly_requests, updated_at"
                " FROM cost_budgets ORDER BY service, tenant_id"
            )
        return [
            BudgetOverride(
                service=r["service"],
                tenant_id=r["tenant_id"] or None,
                daily_usd=r["daily_usd"],
                hourly_requests=r["hourly_requests"],
                updated_at=r["updated_at"],
            )
            for r in rows
        ]

    @translate_errors
    async def set_budget(
        self,
        service: str,
        tenant_id: str | None,
        *,
        daily_usd: Decimal | None = None,
        hourly_requests: int | None = None,
        clear_daily: bool = False,
        clear_hourly: bool = False,
    ) -> BudgetOverride | None:
        """Change only the limits named: a value sets it, `clear_*` takes it back to the
        config, and a limit not named keeps what it was. Returns the runtime row afterwards
        (None when nothing is left over the config)."""
        set_daily = clear_daily or daily_usd is not None
        set_hourly = clear_hourly or hourly_requests is not None
        key = (service, tenant_id or "")
        async with self._conn() as conn, atomic(conn):
            if set_daily or set_hourly:
                await conn.execute(
                    """
                    INSERT INTO cost_budgets (service, tenant_id, daily_usd, hourly_requests)
                    VALUES ($1, $2, $3, $4)
                    ON CONFLICT (service, tenant_id) DO UPDATE
                    SET daily_usd = CASE WHEN $5 THEN EXCLUDED.daily_usd
                                         ELSE cost_budgets.daily_usd END,
                        hourly_requests = CASE WHEN $6 THEN EXCLUDED.hourly_requests
                                               ELSE cost_budgets.hourly_requests END,
                        updated_at = now()
                    """,
                    *key,
                    None if clear_daily else daily_usd,
                    None if clear_hourly else hourly_requests,
                    set_daily,
                    set_hourly,
                )
            await conn.execute(
                "DELETE FROM cost_budgets WHERE service = $1 AND tenant_id = $2"
                " AND daily_usd IS NULL AND hourly_requests IS NULL",
                *key,
            )
            row = await conn.fetchrow(
                "SELECT service, tenant_id, daily_usd, hourly_requests, updated_at"
                " FROM cost_budgets WHERE service = $1 AND tenant_id = $2",
                *key,
            )
        if row is None:
            return None
        return BudgetOverride(
            service=row["service"],
            tenant_id=row["tenant_id"] or None,
            daily_usd=row["daily_usd"],
            hourly_requests=row["hourly_requests"],
            updated_at=row["updated_at"],
        )

    @translate_errors
    async def spend_by_day(self, since: datetime, day_s: int) -> list[SpendRow]:
        """Spend per day window (aligned to the epoch), service and tenant since `since`."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                """
                SELECT to_timestamp(floor(extract(epoch FROM occurred_at) / $2) * $2) AS day,
                       service, tenant_id, unit, count(*) AS requests,
                       sum(units)::bigint AS units, sum(cost_usd) AS cost_usd
                FROM cost_ledger WHERE occurred_at >= $1
                GROUP BY 1, service, tenant_id, unit
                ORDER BY 1 DESC, service, tenant_id NULLS FIRST
                """,
                since,
                day_s,
            )
        return [
            SpendRow(
                day=r["day"],
                service=r["service"],
                tenant_id=r["tenant_id"],
                requests=r["requests"],
                units=r["units"],
                unit=r["unit"],
                cost_usd=r["cost_usd"],
            )
            for r in rows
        ]

    @translate_errors
    async def ledger_totals(self) -> dict[str, tuple[int, int, Decimal]]:
        """Per service, over the whole ledger: (requests, units, cost in USD)."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                "SELECT service, count(*) AS requests, coalesce(sum(units), 0)::bigint AS units,"
                " coalesce(sum(cost_usd), 0) AS cost FROM cost_ledger GROUP BY service"
            )
        return {r["service"]: (r["requests"], r["units"], r["cost"]) for r in rows}
