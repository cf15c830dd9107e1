"""The README's demo, run as a newcomer runs it: its commands against a running `vigie run` on the repository's own
rules, and its `vigie explain` example compared, line numbers included, with what the command prints."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port
from tests.dns_servers import RunningVigie

README = (REPO / "README.md").read_text()
DEMO = README.split("## Try it as a tablet would", 1)[1].split("\n## ", 1)[0]
DEMO_COMMANDS = DEMO.split("```sh\n", 1)[1].split("```", 1)[0].splitlines()
EXPLAIN_BLOCK = DEMO.split("```\n$ ", 1)[1].split("```", 1)[0]


def repository_copy(directory: Path, ut1_archive: Path) -> Path:
    """The repository's rules, inventory and city lists as a newcomer has them, in `directory`; the UT1 source, a
    URL the newcomer's machine may not reach, points at the sample archive (what offline `make run` lacks is UT1,
    which the demo does not use)."""
    for name in ("rules.yaml", "devices.csv"):
        shutil.copy(REPO / name, directory / name)
    shutil.copytree(REPO / "lists", directory / "lists")
    rules = directory / "rules.yaml"
    rules.write_text(re.sub(r"source: https://\S+", f"source: {ut1_archive}", rules.read_text()))
    return rules


def test_the_explain_example_is_what_vigie_prints(tmp_path: Path) -> None:
    """As on a fresh clone: the UT1 lists not downloaded yet (the README says what changes once they are)."""
    for name in ("rules.yaml", "devices.csv"):
        shutil.copy(REPO / name, tmp_path / name)
    shutil.copytree(REPO / "lists", tmp_path / "lists")
    command, _, expected = EXPLAIN_BLOCK.partition("\n")
    assert command.startswith(".venv/bin/vigie explain"), command
    result = subprocess.run([str(REPO / ".venv" / "bin" / "vigie"), *shlex.split(command)[1:]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.replace(str(tmp_path), "<repository>") == expected


class Demo(RunningVigie):
    ready_text = "vigie: DNS on"


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, ut1_archive: Path) -> Iterator[dict[str, int]]:
    directory = tmp_path_factory.mktemp("readme")
    rules = repository_copy(directory, ut1_archive)
    ports = {"5353": free_port(), "8080": free_port(), "9108": free_port()}
    with Demo(["run", "--rules", str(rules), "--dns-listen", f"127.0.0.1:{ports['5353']}",
               "--proxy-listen", f"127.0.0.1:{ports['8080']}", "--metrics-listen", f"127.0.0.1:{ports['9108']}",
               "--api-listen", "off"], directory / "vigie.log"):
        yield ports


def run_demo_line(line: str, ports: dict[str, int]) -> str:
    command = line.split("#", 1)[0]
    for readme_port, port in ports.items():
        command = command.replace(f":{readme_port}", f":{port}").replace(f"-p {readme_port}", f"-p {port}")
    args = shlex.split(command)
    if args[0] == "curl":
        args[1:1] = ["-sS", "--max-time", "10", "-w", "\nstatus %{http_code}"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=REPO)
    return result.stdout + result.stderr


@pytest.mark.parametrize("line", [line for line in DEMO_COMMANDS if line.startswith(("dig", "curl"))])
def test_the_demo_shows_what_the_readme_says(running: dict[str, int], line: str) -> None:
    output = run_demo_line(line, running)
    if line.startswith("dig"):
        assert "status: NXDOMAIN" in output and re.search(r"EDE: (15 \(Blocked\)|17 \(Filtered\))", output), output
    elif "roblox.com" in line:
        assert "status 403" in output and "Site bloqué" in output, output
    else:  # refused when connecting, or blocked by the night profile before: never the metrics
        assert re.search(r"status (502|403)$", output) and "vigie_" not in output, output
