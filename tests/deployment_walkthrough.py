"""Run the commands of docs/deployment.md as they are written there.

Every ```` ```bash ```` block of the page runs, in order, in one bash process (``set -euo
pipefail``) in a folder of its own, so the page and what runs cannot drift apart. A block right
after ``<!-- walkthrough: install -->`` runs only with ``--install`` (without it, the ``bin/`` of
the Python running this script comes first on ``PATH``, as if its venv were activated); a block
right after ``<!-- walkthrough: skip (why) -->`` never runs. The one change made to the text is
to the ports when asked (``--free-ports``, and the tests): each port ``396NN`` of the page is
replaced by a free port, so that two walk-throughs on one machine do not collide.

    python tests/deployment_walkthrough.py DIR [--install] [--free-ports] [--until HEADING]

runs the page in ``DIR`` (which must be empty or absent); ``--install`` makes its venv the way
the page does, with ``./fedssd`` a link to this repository. Background processes the page starts
(the SuperLink, the SuperNodes) are stopped at the end, whatever happened; with ``--until``, the
blocks from that heading on are not run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "deployment.md"
PORT = re.compile(r"\b396\d\d\b")
_FENCE = re.compile(r"^```(\w*)\s*$")
_MARK = re.compile(r"^<!-- walkthrough: (install|skip)\b.*-->\s*$")


@dataclasses.dataclass(frozen=True)
class Block:
    """One fenced code block of the page.

    Attributes:
        heading: The ``##`` heading it is under.
        language: The fence's language (``bash``, ``ini``, ``text``, ...).
        mark: ``install``, ``skip`` or ``""`` (the walkthrough comment right before it).
        text: Its lines.
    """

    heading: str
    language: str
    mark: str
    text: str


def blocks(page: str) -> list[Block]:
    """The fenced code blocks of a Markdown page, in order."""
    found: list[Block] = []
    heading, mark, language = "", "", None
    lines: list[str] = []
    for line in page.splitlines():
        fence = _FENCE.match(line)
        if language is not None:
            if line.strip() == "```":
                found.append(Block(heading, language, mark, "\n".join(lines) + "\n"))
                language, mark, lines = None, "", []
            else:
                lines.append(line)
        elif fence:
            language = fence.group(1)
        elif line.startswith("## "):
            heading, mark = line[3:].strip(), ""
        elif match := _MARK.match(line):
            mark = match.group(1)
        elif line.strip():
            mark = ""
    if language is not None:
        raise ValueError(f"a code block under {heading!r} is not closed")
    return found


def ports(page: str) -> list[int]:
    """The page's ports (``396NN``), each once, in order."""
    return sorted({int(port) for port in PORT.findall(page)})


def with_ports(text: str, mapping: Mapping[int, int]) -> str:
    """``text`` with each of the page's ports replaced by the one ``mapping`` gives it."""
    return PORT.sub(lambda found: str(mapping.get(int(found.group()), found.group())), text)


def script(
    page: str, *, install: bool, until: str | None = None, mapping: Mapping[int, int] = {}
) -> str:
    """The bash script of the page's commands (see the module docstring)."""
    parts = ["set -euo pipefail\n"]
    for block in blocks(page):
        if until is not None and block.heading.startswith(until):
            break
        if block.language != "bash" or block.mark == "skip":
            continue
        if block.mark == "install" and not install:
            continue
        parts.append(f"\n# --- {block.heading}\n{with_ports(block.text, mapping)}")
    return "".join(parts)


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports that nothing listens on now."""
    probes = []
    try:
        for _ in range(count):
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            probes.append(probe)
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def free_mapping(page: str) -> dict[int, int]:
    """Each of the page's ports mapped to a free one."""
    found = ports(page)
    return dict(zip(found, free_ports(len(found)), strict=True))


def environment(*, install: bool, extra: Mapping[str, str] = {}) -> dict[str, str]:
    """The walk-through's environment: this one, with this venv's ``bin/`` first on ``PATH``
    unless the page installs its own."""
    env = dict(os.environ)
    env.pop("FLWR_HOME", None)
    env.pop("VIRTUAL_ENV", None)
    if not install:
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


@contextlib.contextmanager
def session(process: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """Stops every process of ``process``'s session (its background jobs included) on exit."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.wait()
        for signum in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signum)
            if signum == signal.SIGTERM:
                _wait_for_group(process.pid)


def _wait_for_group(group: int, seconds: float = 10.0) -> None:
    """Wait until no live process is left in ``group`` (its members exit on SIGTERM)."""
    deadline = time.monotonic() + seconds
    while _members(group) and time.monotonic() < deadline:
        time.sleep(0.2)


def _members(group: int) -> list[int]:
    """The live (not zombie) processes of process group ``group``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == group:
            found.append(int(entry.name))
    return found


def start(
    folder: Path,
    *,
    install: bool,
    until: str | None = None,
    mapping: Mapping[int, int] = {},
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start the page's commands in ``folder`` (bash in a session of its own; its output goes to
    ``folder/walkthrough.log``)."""
    folder.mkdir(parents=True, exist_ok=True)
    if install and not (folder / "fedssd").exists():
        (folder / "fedssd").symlink_to(REPO)  # the page's "clone of fedssd's repository"
    text = script(PAGE.read_text(encoding="utf-8"), install=install, until=until, mapping=mapping)
    (folder / "walkthrough.sh").write_text(text, encoding="utf-8")
    with (folder / "walkthrough.log").open("wb") as log:
        return subprocess.Popen(
            ["bash", "walkthrough.sh"],
            cwd=folder,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else environment(install=install),
            start_new_session=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--install", action="store_true", help="run the page's install too")
    parser.add_argument("--free-ports", action="store_true", help="use free ports, not 396NN")
    parser.add_argument("--until", help="stop before the section whose heading starts so")
    args = parser.parse_args(argv)
    if args.folder.exists() and any(args.folder.iterdir()):
        parser.error(f"{args.folder} is not empty; the page runs in an empty folder")
    page = PAGE.read_text(encoding="utf-8")
    mapping = free_mapping(page) if args.free_ports else {}
    with session(
        start(args.folder, install=args.install, until=args.until, mapping=mapping)
    ) as run:
        code = run.wait()
    log = args.folder / "walkthrough.log"
    print(log.read_text(errors="replace")[-4000:])
    print(f"walkthrough: exit status {code}; the whole log is {log}")
    return code


if __name__ == "__main__":
    sys.exit(main())
