"""What a site installs: ``fedssd[flower]`` is Flower without its simulation engine (no Ray).

The measured size of such a venv is in docs/deployment.md, step 1.
"""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _extras() -> dict[str, list[Requirement]]:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    return {
        name: [Requirement(text) for text in requirements]
        for name, requirements in project["optional-dependencies"].items()
    }


def test_the_flower_extra_is_flower_without_its_simulation_engine() -> None:
    extras = _extras()
    (flower,) = extras["flower"]
    assert flower.name == "flwr" and flower.extras == set()
    (simulation,) = extras["simulation"]
    assert simulation.name == "flwr" and simulation.extras == {"simulation"}
    assert any(r.name == "flwr" and "simulation" in r.extras for r in extras["dev"])
    # Flower itself needs Ray only for its simulation extra.
    rays = [Requirement(text) for text in metadata.requires("flwr") or []]
    rays = [r for r in rays if r.name == "ray"]
    assert rays and all(r.marker is not None for r in rays)
    assert not any(r.marker.evaluate({"extra": ""}) for r in rays if r.marker is not None)


@pytest.mark.slow
def test_the_server_and_client_apps_never_import_ray() -> None:
    code = (
        "import sys, fedssd.flower.server_app, fedssd.flower.client_app; "
        "sys.exit(int('ray' in sys.modules))"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=600).returncode == 0
