"""`ragstream services mode|check`: the paid services and how they are served."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from ragstream.cli.common import console, run, settings_or_exit

app = typer.Typer(
    help="The paid services (LlamaParse, OpenAI): modes and health.", no_args_is_help=True
)


@app.command("mode")
def mode(
    service: Annotated[str, typer.Argument(help="llamaparse | openai")],
    new_mode: Annotated[str, typer.Argument(metavar="MODE", help="real | local | hybrid")],
    reason: Annotated[str | None, typer.Option(help="Why, for the record.")] = None,
) -> None:
    """Switch a service's mode in every running worker (within seconds, no restart)."""
    import getpass

    from ragstream.control import publish_mode

    settings = settings_or_exit()
    event = run(
        publish_mode, settings, service, new_mode, requested_by=getpass.getuser(), reason=reason
    )
    console.print(f"{event.service}: mode {event.mode.value} published; running workers follow it")


async def _check(settings: Any) -> list[tuple[str, str, str, str, str]]:
    import httpx

    from ragstream.control import snapshot

    state = await snapshot(settings)
    rows = []
    services = {"llamaparse": settings.services.llamaparse, "openai": settings.services.openai}
    async with httpx.AsyncClient(timeout=5.0) as client:
        for name, cfg in services.items():
            try:
                response = await client.get(cfg.base_url)
                reachable = f"yes (HTTP {response.status_code})"
            except httpx.HTTPError as exc:
                reachable = f"no ({type(exc).__name__})"
            key = "present" if cfg.api_key is not None else "missing"
            rows.append(
                (
                    name,
                    state.mode(name).value,
                    reachable,
                    key,
                    "throttled" if state.throttled(name) else "open",
                )
            )
    return rows


@app.command("check")
def check() -> None:
    """Per service: mode (as the workers see it), reachable or not, API key present or not,
    throttle state. Circuit states are per worker: see `ragstream status`."""
    settings = settings_or_exit()
    rows = run(_check, settings)
    table = Table(title="services")
    for col in ("service", "mode", "reachable", "api key", "budget"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)
