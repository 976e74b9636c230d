"""Where settings come from: the bundled `config/ragstream.toml`, the file named by
`RAGSTREAM_CONFIG`, and the short variables the tests and the README use. Secrets are refused in
files: they come only from the environment.
"""

from __future__ import annotations

import logging
import os
import tomllib
from pathlib import Path
from typing import Any, Final

from pydantic_settings import PydanticBaseSettingsSource

from ragstream.errors import ConfigError
from ragstream.resources import config_dir

log = logging.getLogger(__name__)

SECRET_KEYS = (
    "kafka.sasl_password",
    "postgres.password",
    "services.llamaparse.api_key",
    "services.openai.api_key",
)

# Short names the tests and the README use for pointing at existing services.
_SHORTCUTS = {
    "RAGSTREAM_KAFKA_BOOTSTRAP": ("kafka", "bootstrap_servers"),
    "RAGSTREAM_DATABASE_URL": ("postgres", "url"),
}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc


def _check_no_secrets(data: dict[str, Any], path: Path) -> None:
    for dotted in SECRET_KEYS:
        node: Any = data
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            env = "RAGSTREAM_" + dotted.upper().replace(".", "__")
            raise ConfigError(
                f"{dotted}: secrets are read only from the environment ({env}), not from {path}"
            )


def _paths_from(data: dict[str, Any], directory: Path) -> None:
    """A config file's relative `devstack.data_dir` and `blobs.root` are relative to that file's
    directory, not to wherever a command happens to run."""
    for section, key in (("devstack", "data_dir"), ("blobs", "root")):
        value = data.get(section, {}).get(key) if isinstance(data.get(section), dict) else None
        if isinstance(value, str) and not os.path.isabs(os.path.expanduser(value)):
            data[section][key] = str(directory.absolute() / value)


# Sections renamed, old name -> new: the old name is still read, with a one-line notice.
RENAMED_SECTIONS: Final = {"local": "devstack"}


def _renamed(data: dict[str, Any], path: Path) -> None:
    """Move a config file's renamed sections to their new names (a key under the new name wins)."""
    for old, new in RENAMED_SECTIONS.items():
        if old not in data:
            continue
        log.warning(
            "%s: the [%s] section is now [%s]; [%s] is still read for now", path, old, new, old
        )
        section, current = data.pop(old), data.get(new)
        if isinstance(section, dict) and isinstance(current, dict):
            section = {**section, **current}
        data[new] = section if current is None or isinstance(section, dict) else current


def _legacy_environment() -> dict[str, Any]:
    """`RAGSTREAM_LOCAL__*` variables as the renamed section's values."""
    found: dict[str, Any] = {}
    for old, new in RENAMED_SECTIONS.items():
        prefix = f"RAGSTREAM_{old.upper()}__"
        names = sorted(name for name in os.environ if name.upper().startswith(prefix))
        if not names:
            continue
        log.warning(
            "%s: RAGSTREAM_%s__* variables are now RAGSTREAM_%s__*; the old names are still "
            "read for now",
            ", ".join(names),
            old.upper(),
            new.upper(),
        )
        section: dict[str, Any] = found.setdefault(new, {})
        for name in names:
            *parents, key = name[len(prefix) :].lower().split("__")
            node = section
            for part in parents:
                node = node.setdefault(part, {})
            node[key] = os.environ[name]
    return found


class TomlSource(PydanticBaseSettingsSource):
    """Bundled defaults, then the file named by RAGSTREAM_CONFIG, then the legacy `local`
    variables, then the shortcut variables."""

    def get_field_value(
        self, field: Any, field_name: str
    ) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        default_path = config_dir() / "ragstream.toml"
        data = _read_toml(default_path)
        _check_no_secrets(data, default_path)
        _renamed(data, default_path)
        extra = os.environ.get("RAGSTREAM_CONFIG")
        if extra:
            extra_data = _read_toml(Path(extra))
            _check_no_secrets(extra_data, Path(extra))
            _renamed(extra_data, Path(extra))
            _paths_from(extra_data, Path(extra).parent)
            data = deep_merge(data, extra_data)
        # Below RAGSTREAM_DEVSTACK__* (the environment source), above every file.
        data = deep_merge(data, _legacy_environment())
        for env, (section, key) in _SHORTCUTS.items():
            if os.environ.get(env):
                data = deep_merge(data, {section: {key: os.environ[env]}})
        return data
