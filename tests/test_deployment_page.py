"""docs/deployment.md as a script: which of its blocks run, and what its units say (without
running anything; tests/flower/test_deployment.py runs the page)."""

from __future__ import annotations

import re
import shlex

import deployment_walkthrough as walkthrough

PAGE = walkthrough.PAGE.read_text(encoding="utf-8")


def test_every_command_block_runs_but_the_install_and_the_resume() -> None:
    blocks = [b for b in walkthrough.blocks(PAGE) if b.language == "bash"]
    assert [b.mark for b in blocks].count("install") == 1
    (skipped,) = [b for b in blocks if b.mark == "skip"]
    assert "resume=true" in skipped.text
    script = walkthrough.script(PAGE, install=False)
    assert "pip install" not in script and script.startswith("set -euo pipefail")
    assert "pip install" in walkthrough.script(PAGE, install=True)
    # Each section's commands in the page's order, the stop last.
    headings = re.findall(r"^# --- (.+)$", script, flags=re.MULTILINE)
    assert headings[0].startswith("2.") and headings[-1] == "9. Stop"
    assert walkthrough.script(PAGE, install=False, until="9. Stop") in script


def test_the_ports_are_distinct_and_replaced_everywhere() -> None:
    nodes = re.findall(r"flower-supernode .*?--port (\d+)", PAGE.replace("\\\n", " "))
    assert len(nodes) >= 3 and len(set(nodes[:3])) == 3  # one host: one port per node
    mapping = {port: 50000 + i for i, port in enumerate(walkthrough.ports(PAGE))}
    script = walkthrough.script(PAGE, install=False, mapping=mapping)
    assert not walkthrough.PORT.search(script)
    assert "127.0.0.1:50000" in script


def test_the_units_run_by_full_path_with_the_venv_on_path_and_always_restart() -> None:
    units = [b for b in walkthrough.blocks(PAGE) if b.language == "ini"]
    assert {u.text.splitlines()[0].split()[1] for u in units} == {
        "/etc/systemd/system/fedssd-superlink.service",
        "/etc/systemd/system/fedssd-supernode.service",
    }
    for unit in units:
        settings = [line.partition("=") for line in unit.text.splitlines() if "=" in line]
        command = shlex.split(next(v for k, _, v in settings if k == "ExecStart"))
        paths = [v[5:] for k, _, v in settings if k == "Environment" and v.startswith("PATH=")]
        assert command[0].startswith("/srv/fedssd/fedssd-env/bin/")
        assert paths and paths[0].split(":")[0] == "/srv/fedssd/fedssd-env/bin"
        assert ("Restart", "=", "always") in settings
    superlink = next(u for u in units if "superlink" in u.text.splitlines()[0])
    assert "--database" in superlink.text
