"""The chaos test: documents flowing through worker processes while a random worker is
SIGKILLed every 10 s, the broker is SIGKILLed and restarted, and PostgreSQL is stopped for
20 s; then nothing may be lost, duplicated or dead-lettered. tests/integration/chaos_driver.py
runs it; benchmarks/chaos.py is the long run on the same driver.

The broker and PostgreSQL are the test's own, not the session's: it kills them on purpose, and
a run that fails half-way must not leave the rest of the suite without them (nor can it kill
the services RAGSTREAM_KAFKA_BOOTSTRAP and RAGSTREAM_DATABASE_URL name). Run it with `-s` to
watch its progress; a failure prints the whole report.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ragstream.errors import InfrastructureError
from tests.integration.chaos_driver import (
    ChaosPlan,
    Services,
    run_chaos,
    snapshot_printer,
    start_services,
)
from tests.integration.chaos_report import ChaosEvent

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def chaos_services() -> Iterator[Services]:
    """A broker and a PostgreSQL of this test's own, which it may kill and restart."""
    directory = Path(tempfile.mkdtemp(prefix="ragstream-chaos-"))
    directory.chmod(0o711)  # PostgreSQL's system user passes through
    try:
        services = start_services(directory)
    except InfrastructureError as exc:
        shutil.rmtree(directory, ignore_errors=True)
        pytest.fail(f"the chaos test's broker or PostgreSQL did not start: {exc}", pytrace=False)
    yield services
    services.stop()
    shutil.rmtree(directory, ignore_errors=True)


def _print_event(event: ChaosEvent) -> None:
    print(f"{event.at_s:7.1f}s  {event.what}", flush=True)


@pytest.mark.timeout(900)
async def test_chaos_loses_duplicates_and_dead_letters_nothing(
    chaos_services: Services, tmp_path: Path
) -> None:
    plan = ChaosPlan(
        documents=300,
        kill_interval_s=10.0,
        broker_restarts=1,
        postgres_restarts=1,
        postgres_stop_s=20.0,
        workers=("all", "all", "parse", "chunk", "embed"),
    )
    report = await run_chaos(
        chaos_services,
        plan,
        tmp_path / "chaos",
        on_progress=snapshot_printer(10.0),
        on_event=_print_event,
    )
    summary = report.describe()
    print(summary)

    uploaded, lost, duplicates = report.uploaded, report.lost, report.duplicates
    dead_lettered, dlq_depth, statuses = report.dead_lettered, report.dlq_depth, report.statuses
    assert uploaded == plan.documents, summary
    assert report.kills >= 5 and [k for k, _ in report.outages] == ["kafka", "postgres"], summary
    assert lost == 0, summary
    assert duplicates == 0, summary
    assert dead_lettered == 0, summary
    assert statuses == {"embedded": plan.documents}, summary
    assert dlq_depth == 0, summary
    assert report.status_dlq_disagree == 0, summary
