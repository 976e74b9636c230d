"""Worker processes kept running as a supervisor would (systemd's `Restart=always`), for the
chaos run (tests/integration/chaos_driver.py): each `ragstream worker <stage>` process that ends
is started again after a second and its last words are kept; `kill_random` SIGKILLs one and
starts it again at once. Each process writes its JSON log to a file of its own."""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ragstream.settings import Settings
from ragstream.topology import Stage
from tests.integration.chaos_report import WorkerExit
from tests.integration.pipeline_helpers import WorkerProcess, wait_until


@dataclass
class _Slot:
    number: int
    stage: str
    proc: WorkerProcess | None = None
    generation: int = 0
    restart_at: float | None = None  # it ended: start it again then


class Supervisor:
    """Worker processes kept running: one that ends is started again after `restart_delay_s`;
    `kill_random` SIGKILLs one and starts it again at once."""

    def __init__(
        self,
        settings: Settings,
        stages: Sequence[str],
        log_dir: Path,
        clock: Callable[[], float],
        note: Callable[[str], None],
        restart_delay_s: float = 1.0,
    ) -> None:
        self.settings = settings
        self.log_dir = log_dir
        self.clock = clock
        self.note = note
        self.restart_delay_s = restart_delay_s
        self.slots = [_Slot(n, stage) for n, stage in enumerate(stages)]
        self.kills = 0
        self.exits: list[WorkerExit] = []
        self._lock = asyncio.Lock()

    def _launch(self, slot: _Slot) -> None:
        slot.generation += 1
        slot.restart_at = None
        log = self.log_dir / f"worker{slot.number}-{slot.stage}-{slot.generation}.log"
        client_id = f"chaos-{slot.number}-{slot.generation}"
        slot.proc = WorkerProcess(self.settings, slot.stage, log, client_id=client_id).start()

    def start_all(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for slot in self.slots:
            self._launch(slot)

    async def wait_started(self, timeout_s: float) -> None:
        """Until every process has every stage it runs consuming."""

        def started() -> bool:
            for slot in self.slots:
                assert slot.proc is not None and slot.proc.alive(), slot.proc and slot.proc.tail()
                need = {s.value for s in Stage} if slot.stage == "all" else {slot.stage}
                if not need <= {e.get("stage") for e in slot.proc.events("consumer started")}:
                    return False
            return True

        await wait_until(
            started, timeout_s, "the workers to start", poll_s=0.25, explain=self.tails
        )

    def tails(self) -> str:
        return "\n".join(
            f"--- worker {s.number} ({s.stage}):\n{s.proc.tail(15)}" for s in self.slots if s.proc
        )

    async def kill_random(self, rng: random.Random) -> None:
        async with self._lock:
            alive = [s for s in self.slots if s.proc is not None and s.proc.alive()]
            if not alive:
                return
            slot = rng.choice(alive)
            assert slot.proc is not None
            pid = slot.proc.pid
            await asyncio.to_thread(slot.proc.kill)
            self.kills += 1
            self._launch(slot)
            self.note(f"SIGKILL worker {slot.number} ({slot.stage}, pid {pid}); started again")

    async def watch(self) -> None:
        """Start again every process that ended on its own (until cancelled)."""
        while True:
            async with self._lock:
                now = time.monotonic()
                for slot in self.slots:
                    if slot.proc is None or slot.proc.alive():
                        continue
                    if slot.restart_at is None:
                        code = slot.proc.proc.returncode if slot.proc.proc else None
                        words = last_words(slot.proc.log_path)
                        self.exits.append(
                            WorkerExit(
                                self.clock(),
                                slot.number,
                                slot.stage,
                                code,
                                words,
                                slot.proc.log_path,
                            )
                        )
                        self.note(f"worker {slot.number} ({slot.stage}) exited {code}: {words}")
                        slot.restart_at = now + self.restart_delay_s
                    elif now >= slot.restart_at:
                        self._launch(slot)
            await asyncio.sleep(0.25)

    async def stop_all(self) -> list[int]:
        async with self._lock:
            procs = [s.proc for s in self.slots if s.proc is not None]
            return list(await asyncio.gather(*(p.stop() for p in procs)))


def last_words(log: Path, limit: int = 240) -> str:
    """Why a worker process ended, from the end of its log: what it printed after its last JSON
    log line (an error line; of a traceback, its last line: the exception), else that JSON
    line's event."""
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except FileNotFoundError:
        return "(no log)"
    plain: list[str] = []
    for line in reversed(lines):
        try:
            parsed = json.loads(line)
        except ValueError:
            plain.insert(0, line.rstrip())
            continue
        if plain:
            break
        if isinstance(parsed, dict):
            return str(parsed.get("event", line))[:limit]
    if "--- Logging error ---" in plain:  # what logging printed while the process shut down
        plain = plain[: plain.index("--- Logging error ---")]
    if any(ln.startswith("Traceback") for ln in plain):
        top = [ln for ln in plain if not ln.startswith((" ", "Traceback", "During", "The above"))]
        return (top[-1] if top else plain[-1])[:limit]
    return " ".join(ln.strip() for ln in plain)[:limit]
