"""Every `sh` block of docs/runbooks/, run as an operator types it, against a stack of its own.

One stack serves every page (its own data directory and ports, `ragstream stack up` run by
startup.md itself), and a local server that speaks OpenAI's API stands for OpenAI: the workers
call it whenever the `openai` service is in `real` mode. The pages run in order, each command
through bash (`ragstream` on PATH runs `python -m ragstream` with the stack's environment), with
the placeholders filled; each must exit 0, or with the code its `# exits N` comment names.

Before a section, the stack is brought into that section's situation (`SITUATIONS`), and after
it, where the page promises an outcome, the test waits for it:

- troubleshooting, DLQ growing: the OpenAI server refuses a document (`insufficient_quota`);
  the page's redrive must then get it embedded. It is `<document-id>` from there on.
- troubleshooting, a circuit open: the OpenAI server is stopped until the circuit opens.
- troubleshooting, a stage with no members: the workers are stopped and a document waits. The
  page's `stack up` starts them on the next release, whose chunk settings differ: the bad
  deploy that incident.md and rollback.md handle.
- cost-limit: a daily budget of $0 throttles `openai` in `real` mode and a document waits; the
  page's raise must get it embedded.
- incident: the broker, then PostgreSQL, stopped; a flood of undecodable records; the bad
  deploy's chunk replay.
- rollback: the documents are on the next release's chunker version, the older one is
  `<chunker-version>`; afterwards every document holding the older chunks must point at them.
  The older settings are in force again for the backup page's restart.
- backup-restore: after the backup, the tenant's documents are deleted from the database; the
  page's restore must bring back as many as there were.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from producers.upload import Uploader
from ragstream.control import publish_mode
from ragstream.settings import Settings, load_settings
from ragstream.topology import Topology
from tests.local_stack import own_stack
from tests.runbooks.runbook_pages import PAGES, ROOT, Command, commands
from tests.servers.openai_server import Fault, OpenAIServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TENANT = "runbooks"  # <tenant>: the samples start-up uploads, and the smoke tests
FAULTS = "runbooks-faults"  # the documents the situations make, kept apart from <tenant>'s
# The release the bad deploy brings: other chunk settings, so another chunker version.
NEXT_RELEASE = {"RAGSTREAM_CHUNK__MAX_TOKENS": "200", "RAGSTREAM_CHUNK__OVERLAP_TOKENS": "20"}
POISON_RECORDS = 40
DONE = {"embedded", "duplicate"}  # a document there goes nowhere else by itself


class Runbook:
    """The stack the pages run against, the placeholders' values, and the situations' tools."""

    def __init__(self, env: dict[str, str], openai: OpenAIServer, bin_dir: Path) -> None:
        self.env = env
        self.openai = openai
        self.done: list[str] = []  # pages run so far
        self.timings: list[tuple[str, str, float]] = []  # page, what ran, seconds
        self.held: list[str] = []  # documents a situation expects the page to get embedded
        self.deployed = False  # the bad deploy's reprocessing has run
        self.documents_at_backup = 0  # the tenant's documents when the backup was taken
        data = env["RAGSTREAM_DEVSTACK__DATA_DIR"]
        self.values = {
            "tenant": TENANT,
            "stage": "embed",
            "worker": f"127.0.0.1:{env['RAGSTREAM_OBSERVABILITY__METRICS_PORT']}",
            "data-dir": data,
            "backup-dir": str(Path(data).parent / "backup"),
        }
        shim = bin_dir / "ragstream"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ragstream "$@"\n')
        shim.chmod(0o755)
        self.path = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"

    # -- the pages' commands -----------------------------------------------------------------

    def fill(self, command: Command) -> str:
        line = command.line
        for name in command.placeholders:
            assert name in self.values, f"{command.page}: nothing fills <{name}> yet: {line}"
            line = line.replace(f"<{name}>", self.values[name])
        return line

    def run(self, command: Command) -> None:
        line = self.fill(command)
        started = time.monotonic()
        done = subprocess.run(
            ["bash", "-o", "pipefail", "-c", line],
            env={**self.env, "PATH": self.path},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.timings.append((command.page, line, time.monotonic() - started))
        assert done.returncode == command.exit_code, (
            f"{command.page}#{command.section}: `{line}` exited {done.returncode}, "
            f"expected {command.exit_code}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )

    def timed(self, page: str, what: str, step: Callable[[Runbook], None]) -> None:
        started = time.monotonic()
        step(self)
        self.timings.append((page, what, time.monotonic() - started))

    def ragstream(self, *args: str) -> None:
        """A command a situation needs (not a page's)."""
        done = subprocess.run(
            [sys.executable, "-m", "ragstream", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, (args, done.stdout[-3000:], done.stderr[-3000:])

    # -- the stack, from this process --------------------------------------------------------

    def settings(self) -> Settings:
        env = self.env
        return load_settings(
            kafka={"bootstrap_servers": env["RAGSTREAM_KAFKA__BOOTSTRAP_SERVERS"]},
            postgres={"url": None, "port": int(env["RAGSTREAM_POSTGRES__PORT"])},
            devstack={"data_dir": env["RAGSTREAM_DEVSTACK__DATA_DIR"]},
        )

    def sql(self, query: str, *args: object) -> list[asyncpg.Record]:
        async def fetch() -> list[asyncpg.Record]:
            connection = await asyncpg.connect(self.settings().postgres.dsn())
            try:
                rows: list[asyncpg.Record] = await connection.fetch(query, *args)
            finally:
                await connection.close()
            return rows

        return asyncio.run(fetch())

    def upload(self, text: str, filename: str) -> str:
        """A Markdown document of the faults tenant, published; its id."""

        async def publish() -> str:
            async with Uploader(self.settings()) as up:
                receipt = await up.upload_bytes(text.encode(), filename, tenant_id=FAULTS)
            return receipt.document_id

        return asyncio.run(publish())

    def mode(self, service: str, mode: str) -> None:
        asyncio.run(publish_mode(self.settings(), service, mode, requested_by="runbook test"))

        def every_worker_moved() -> bool:  # the gauge is the highest over the worker processes
            others = [m for m in ("local", "real", "hybrid") if m != mode]
            gauge = "ragstream_service_mode"
            return self.metric(gauge, service=service, mode=mode) == 1 and not any(
                self.metric(gauge, service=service, mode=m) for m in others
            )

        wait_for(every_worker_moved, f"every worker serving {service} in {mode} mode")

    def metric(self, name: str, **labels: str) -> float | None:
        """The highest value of `name` with these labels at the workers' /metrics."""
        url = f"http://{self.values['worker']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as page:
            text = page.read().decode()
        values = [
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        ]
        return max(values, default=None)

    def status(self, document_id: str) -> str:
        rows = self.sql("SELECT status FROM documents WHERE document_id = $1", document_id)
        return str(rows[0]["status"]) if rows else "unknown"

    def wait_status(self, document_id: str, status: str, timeout_s: float = 90) -> None:
        def reached() -> bool:
            now = self.status(document_id)
            assert now == status or now not in DONE, f"{document_id} is {now}, not {status}"
            return now == status

        wait_for(reached, f"{document_id} {status}", timeout_s)


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"waited {timeout_s:.0f} s for {what}"
        time.sleep(0.5)


# -- situations ---------------------------------------------------------------------------------


def refused_by_openai(rb: Runbook) -> None:
    rb.mode("openai", "real")
    rb.openai.inject(Fault.insufficient_quota())
    document_id = rb.upload("# Quota\n\nThis one reaches OpenAI without credit.", "quota.md")
    rb.wait_status(document_id, "dead-lettered")
    rb.values["document-id"] = document_id[:8]  # as the tables show it
    rb.held = [document_id]


def openai_down(rb: Runbook) -> None:
    rb.openai.stop()
    for n in range(5):  # five failed calls open the circuit (services.openai.circuit_failures)
        rb.upload(f"# Outage {n}\n\nWritten while OpenAI is away, number {n}.", f"outage-{n}.md")
    wait_for(lambda: rb.metric("ragstream_circuit_state", service="openai") == 2, "open circuit")


def workers_gone(rb: Runbook) -> None:
    rb.ragstream("stack", "down", "workers")
    # The workers start again on the next release; what the tenant's documents have now is
    # what rollback.md goes back to.
    rb.env.update(NEXT_RELEASE)
    (before,) = rb.sql(
        "SELECT DISTINCT current_chunker_version AS chunker,"
        " current_embedding_model || ':' || current_embedding_dimensions AS model"
        " FROM documents WHERE tenant_id = $1 AND status = 'embedded'",
        TENANT,
    )
    rb.values["chunker-version"] = before["chunker"]
    rb.values["embedding-model"] = before["model"]
    rb.upload("# Waiting\n\nPublished while no worker runs.", "waiting.md")


def budget_spent(rb: Runbook) -> None:
    rb.mode("openai", "real")
    rb.ragstream("cost", "budget", "openai", "--daily-usd", "0")
    wait_for(lambda: rb.metric("ragstream_stage_paused", stage="embed") == 1, "embed paused")
    document_id = rb.upload("# Held\n\nWaits for the budget.", "held.md")
    rb.wait_status(document_id, "chunked")
    rb.held = [document_id]


def broker_down(rb: Runbook) -> None:
    rb.ragstream("stack", "down", "kafka")


def database_down(rb: Runbook) -> None:
    rb.ragstream("stack", "down", "postgres")


def poison_flood(rb: Runbook) -> None:
    def poison() -> float:
        return rb.metric("ragstream_records_total", stage="parse", outcome="poison") or 0

    before = poison()

    async def publish() -> None:
        producer = AIOKafkaProducer(**rb.settings().kafka.client_options())
        await producer.start()
        try:
            for n in range(POISON_RECORDS):
                value = b"not a ragstream event %d" % n
                await producer.send(Topology().uploaded, value, key=b"flood-%d" % n)
            await producer.flush()
        finally:
            await producer.stop()

    asyncio.run(publish())
    wait_for(lambda: poison() >= before + POISON_RECORDS, "the flood dead-lettered")


def bad_deploy(rb: Runbook) -> None:
    """The workers run the next release (since `A stage with no members`): reprocess the
    tenant's documents with it, as its release notes would say."""
    if rb.deployed:
        return
    rb.ragstream("replay", "chunk", "--live", "--earliest", "--tenant", TENANT)

    def moved() -> bool:
        (row,) = rb.sql(
            "SELECT count(*) FILTER (WHERE searchable_chunker_version = $2) AS old,"
            " count(*) AS all FROM documents WHERE tenant_id = $1 AND status = 'embedded'",
            TENANT,
            rb.values["chunker-version"],
        )
        return bool(row["old"] == 0 and row["all"] > 0)

    wait_for(moved, "the tenant's documents on the next release's chunks")
    rb.deployed = True


def older_release_back(rb: Runbook) -> None:
    bad_deploy(rb)
    for name in NEXT_RELEASE:  # in force at the next restart (the backup page's)
        rb.env.pop(name, None)


def rolled_back(rb: Runbook) -> None:
    """Every document of the tenant that holds the older version's chunks points at them."""
    (row,) = rb.sql(
        "SELECT count(*) FILTER (WHERE d.searchable_chunker_version = $2) AS back,"
        " count(*) AS holding FROM documents d"
        " WHERE d.tenant_id = $1 AND d.status = 'embedded' AND EXISTS (SELECT 1 FROM chunks c"
        "  WHERE c.document_id = d.document_id AND c.chunker_version = $2)",
        TENANT,
        rb.values["chunker-version"],
    )
    assert row["back"] == row["holding"] > 0, dict(row)


def tenant_documents(rb: Runbook) -> int:
    (row,) = rb.sql("SELECT count(*) AS n FROM documents WHERE tenant_id = $1", TENANT)
    return int(row["n"])


def backup_due(rb: Runbook) -> None:
    rb.documents_at_backup = tenant_documents(rb)


def tenant_lost(rb: Runbook) -> None:
    """The damage the restore repairs: the tenant's documents (and, by cascade, their parse
    results, chunks, embeddings and journeys) gone from the database."""
    rb.sql("DELETE FROM documents WHERE tenant_id = $1", TENANT)
    assert tenant_documents(rb) == 0


def tenant_back(rb: Runbook) -> None:
    assert tenant_documents(rb) == rb.documents_at_backup > 0


def held_documents_embedded(rb: Runbook) -> None:
    for document_id in rb.held:
        rb.wait_status(document_id, "embedded")
    rb.held = []


def openai_back(rb: Runbook) -> None:
    rb.openai.start()


def openai_local(rb: Runbook) -> None:
    held_documents_embedded(rb)
    rb.mode("openai", "local")


@dataclass(frozen=True)
class Situation:
    before: Callable[[Runbook], None]
    after: Callable[[Runbook], None] | None = None


SITUATIONS = {
    ("troubleshooting.md", "dlq-growing"): Situation(refused_by_openai, held_documents_embedded),
    ("troubleshooting.md", "a-circuit-open"): Situation(openai_down, openai_back),
    ("troubleshooting.md", "a-stage-with-no-members"): Situation(workers_gone),
    ("cost-limit.md", "throttled"): Situation(budget_spent, openai_local),
    ("incident.md", "broker-down"): Situation(broker_down),
    ("incident.md", "database-down"): Situation(database_down),
    ("incident.md", "a-poison-pill-flood"): Situation(poison_flood),
    ("incident.md", "a-bad-deploy"): Situation(bad_deploy),
    ("rollback.md", "rolling-back-chunks-or-embeddings"): Situation(
        older_release_back, rolled_back
    ),
    ("backup-restore.md", "taking-a-backup"): Situation(backup_due),
    ("backup-restore.md", "restoring"): Situation(tenant_lost, tenant_back),
}


@pytest.fixture(scope="module")
def runbook(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runbook]:
    with OpenAIServer() as openai, own_stack("ragstream-runbooks-") as env:
        env.update(
            RAGSTREAM_SERVICES__OPENAI__BASE_URL=openai.base_url,
            RAGSTREAM_SERVICES__OPENAI__API_KEY="test-key",
        )
        rb = Runbook(env, openai, tmp_path_factory.mktemp("bin"))
        yield rb
        print("\nseconds per page (commands + situations) and the slowest steps:")
        for page, steps in groupby(rb.timings, key=lambda t: t[0]):
            times = [seconds for _, _, seconds in steps]
            print(f"  {page:20} {sum(times):5.0f} s  ({len(times)} steps)")
        for page, what, seconds in sorted(rb.timings, key=lambda t: -t[2])[:8]:
            print(f"  {seconds:5.1f} s  {page}: {what}")


def run_page(rb: Runbook, page: str) -> None:
    for section, group in groupby(commands(page), key=lambda c: c.section):
        situation = SITUATIONS.get((page, section))
        if situation:
            rb.timed(page, f"[before {section}]", situation.before)
        for command in group:
            rb.run(command)
        if situation and situation.after:
            rb.timed(page, f"[after {section}]", situation.after)
    rb.done.append(page)


@pytest.mark.parametrize("page", PAGES)
def test_the_page_runs_as_written(runbook: Runbook, page: str) -> None:
    for earlier in PAGES[: PAGES.index(page)]:  # each page starts where the ones before left
        if earlier not in runbook.done:
            run_page(runbook, earlier)
    run_page(runbook, page)
