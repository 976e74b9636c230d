"""The wheel ships schemas/ and config/ inside the package, and the console script."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_wheel_contains_schemas_config_and_packages(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--quiet",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("ragstream-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    schemas = {p.name for p in (ROOT / "schemas").glob("*.avsc")}
    assert schemas, "no schemas in the checkout"
    for name in schemas:
        assert f"ragstream/_bundled/schemas/{name}" in names
    assert "ragstream/_bundled/config/ragstream.toml" in names
    assert "ragstream/_bundled/config/kafka/pom.xml" in names
    assert "ragstream/store/migrations/0001_initial.sql" in names
    assert "ragstream/samples/docs/kafka-consumer-groups.pdf" in names
    for package in ("ragstream", "consumers", "producers"):
        assert f"{package}/__init__.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "ragstream = ragstream.cli:main" in text
