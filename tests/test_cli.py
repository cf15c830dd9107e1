"""`vigie check` and `vigie explain` as an admin runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, free_port, write_tree
from tests.test_loader import BASE


def vigie(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vigie", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_check_accepts_valid_rules_with_a_summary(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": BASE, "city.txt": "roblox.com\nminecraft.net\n"})
    result = vigie("check", str(rules))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "groups (2)" in result.stdout
    assert "games                        2 domains" in result.stdout
    kiosk = BASE.replace("  cm2-b: {networks: [10.20.2.0/24], schedule: school}",
                         "  cm2-b: {addresses: [10.30.0.10-10.30.0.20], schedule: school}")
    rules.write_text(kiosk)
    result = vigie("check", str(rules))
    assert result.returncode == 0, result.stderr
    assert "11 address(es); 0 device(s)" in result.stdout, result.stdout


def test_check_takes_the_rules_as_every_other_command_does_too(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": BASE, "city.txt": "roblox.com\nminecraft.net\n"})
    assert vigie("check", "--rules", str(rules)).returncode == 0
    both = vigie("check", str(rules), "--rules", str(tmp_path / "other.yaml"))
    assert both.returncode == 1 and "two rules files named" in both.stderr


def test_check_lists_every_error_and_exits_1(tmp_path: Path) -> None:
    text = BASE.replace("10.20.2.0/24", "10.20.300.0/24").replace("[games]}", "[gmaes]}")
    rules = write_tree(tmp_path, {"rules.yaml": text, "city.txt": "roblox.com\n"})
    result = vigie("check", str(rules))
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "rules.yaml:" in line and "warning" not in line
              and "error(s)" not in line]
    assert [e.split(": ", 2)[1] for e in errors] == ["groups.cm2-b.networks[0]", "profiles.class.block[0]"]
    assert "2 error(s), 1 warning(s); nothing was changed" in result.stderr


def test_check_of_a_missing_file_says_so(tmp_path: Path) -> None:
    result = vigie("check", str(tmp_path / "nope.yaml"))
    assert result.returncode == 1 and "cannot read the rules file" in result.stderr


def test_the_repository_rules_check_without_downloaded_lists() -> None:
    result = vigie("check", "rules.yaml")
    assert result.returncode == 0, result.stderr
    assert "run `vigie lists update` to download it" in result.stderr


def test_explain_prints_the_chain_of_reasons(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": BASE, "city.txt": "roblox.com\n"})
    result = vigie("explain", "--rules", str(rules), "--client", "10.20.1.17", "--at", "2026-11-23T14:05",
                   "www.roblox.com")
    assert result.returncode == 0, result.stderr
    assert "decision: BLOCK (category)" in result.stdout
    assert "client → group cm2-a (network 10.20.1.0/24 of group cm2-a)" in result.stdout
    assert "profile class in force (schedules.school.rules[0]" in result.stdout
    assert "holds until: 2026-11-23 16:30" in result.stdout
    evening = vigie("explain", "--rules", str(rules), "--client", "10.20.1.17", "--at", "2026-11-23T18:05",
                    "https://roblox.com/games")
    assert "decision: BLOCK (category)" in evening.stdout and "profile home in force (default of schedule" \
        in evening.stdout


def test_explain_rejects_a_bad_time(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": BASE, "city.txt": "roblox.com\n"})
    result = vigie("explain", "--rules", str(rules), "--client", "10.20.1.17", "--at", "tomorrow", "a.fr")
    assert result.returncode == 1 and "--at 'tomorrow' is not a date and time" in result.stderr


def test_explain_refuses_a_time_the_clocks_skip_and_names_the_pass_of_one_they_repeat(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": BASE.replace('time: "08:30-16:30"', 'time: "02:15-02:45"')
                                  .replace("days: [mon-fri]", "days: [sun]"), "city.txt": "roblox.com\n"})
    ask = ("explain", "--rules", str(rules), "--client", "10.20.1.17", "--no-state", "--at")
    skipped = vigie(*ask, "2027-03-28T02:30", "lumni.fr")
    assert skipped.returncode == 1
    assert "02:30 on 2027-03-28 does not exist in Europe/Paris: clocks go from 02:00 to 03:00" in skipped.stderr
    first = vigie(*ask, "2026-10-25T02:30", "lumni.fr")
    assert "at Sunday 2026-10-25 02:30 CEST" in first.stdout
    assert "this is the first pass, 02:30 CEST (+02:00); for the second, write --at 2026-10-25T02:30+01:00" \
        in first.stdout
    second = vigie(*ask, "2026-10-25T02:30+01:00", "lumni.fr")
    assert "at Sunday 2026-10-25 02:30 CET" in second.stdout and "note:" not in second.stdout
    # Both passes are inside 02:15-02:45, and each holds until its own pass ends (not an hour later).
    assert "profile class in force" in first.stdout and "holds until: 2026-10-25 02:45" in first.stdout
    assert "profile class in force" in second.stdout and "holds until: 2026-10-25 02:45" in second.stdout
    same_instant = vigie(*ask, "2027-03-28T01:20+00:00", "lumni.fr")  # 03:20 CEST, after the line that never held
    assert "at Sunday 2027-03-28 03:20 CEST" in same_instant.stdout and "profile home" in same_instant.stdout


def test_explain_includes_the_overrides_in_the_state_store(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": BASE, "city.txt": "roblox.com\n"})
    made = vigie("override", "allow", "--rules", str(rules), "--group", "cm2-a", "--domain", "roblox.com",
                 "--for", "1h", "--note", "jeu de logique", "--by", "m.durand")
    assert made.returncode == 0, made.stderr
    override_id = made.stdout.split(":")[0]
    result = vigie("explain", "--rules", str(rules), "--client", "10.20.1.17", "www.roblox.com")
    assert "decision: ALLOW (override_allow)" in result.stdout, result.stdout
    assert f"allowed by override {override_id} for roblox.com (group cm2-a, by m.durand)" in result.stdout
    assert f"with the overrides and screen time in sqlite://{tmp_path}/var/state.sqlite3" in result.stdout
    rules_only = vigie("explain", "--rules", str(rules), "--client", "10.20.1.17", "--no-state", "www.roblox.com")
    assert "decision: BLOCK (category)" in rules_only.stdout


def test_a_name_from_a_device_cannot_forge_a_log_line() -> None:
    script = (
        "import logging\n"
        "from vigie.cli import configure_logging\n"
        "configure_logging(logging.INFO)\n"
        "sni = 'x.example\\n2026-11-26 08:00:00,000 INFO vigie.runner: rules reloaded\\u2028'\n"
        "logging.getLogger('mitmproxy.proxy.server').warning(f'Client TLS handshake failed for {sni}')\n"
        "logging.getLogger('vigie.test').warning('host %s refused', sni)\n"
        "logging.getLogger('vigie.test').error('reload refused:\\n%s', 'a problem')\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=30)
    lines = result.stderr.splitlines()
    assert len(lines) == 4, lines  # two forged lines escaped, our own two-line message kept as written
    assert lines[0].endswith(r"for x.example\x0a2026-11-26 08:00:00,000 INFO vigie.runner: rules reloaded\u2028")
    assert lines[1].endswith(r"host x.example\x0a2026-11-26 08:00:00,000 INFO vigie.runner: rules reloaded\u2028 "
                             "refused")
    assert lines[3] == "a problem"


def test_the_services_do_not_load_what_only_other_commands_use() -> None:
    """Every `vigie` process builds the whole command parser; a DNS worker must not carry the crypto library of
    `vigie devices` (~12 MB per process) or the QR encoder."""
    probe = ("import sys; from vigie.cli import _parser; _parser(); import vigie.runner; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'cryptography', 'segno', 'mitmproxy', 'bcrypt'}))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_a_reader_that_stops_early_gets_no_traceback(tmp_path: Path) -> None:
    """`vigie explain ... | head -1`: the pipe closes before vigie has written everything."""
    rules = write_tree(tmp_path, {"rules.yaml": """
        groups:
          school: {networks: [10.20.1.0/24], profile: class}
        profiles:
          class: {deny: [tiktok.com]}
        always_block: []
        """})
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first byte
    with os.fdopen(write_end, "wb") as closed_pipe:
        result = subprocess.run([sys.executable, "-m", "vigie", "explain", "--rules", str(rules), "--client",
                                 "10.20.1.5", "tiktok.com"], stdout=closed_pipe, stderr=subprocess.PIPE, text=True,
                                timeout=60)
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr, result.stderr
    assert result.returncode == 141


def test_explain_resolve_judges_the_chain_as_the_dns_front_does(tmp_path: Path) -> None:
    from tests.dns_servers import UpstreamServer

    rules = write_tree(tmp_path, {"rules.yaml": BASE, "city.txt": "roblox.com\n"})
    with UpstreamServer() as upstream:
        upstream.aliases = {"play.pupil.example": "hop.pupil.example", "hop.pupil.example": "www.roblox.com",
                            "fine.pupil.example": "cdn.example"}
        cloaked = vigie("explain", "--rules", str(rules), "--client", "10.20.1.17", "--resolve", "--upstream",
                        f"127.0.0.1:{upstream.port}", "play.pupil.example")
        assert cloaked.returncode == 0, cloaked.stderr
        out = cloaked.stdout
        assert "decision: ALLOW (default)" in out, "the question alone is allowed"
        assert "play.pupil.example → hop.pupil.example → www.roblox.com → 192.0.2.1" in out, out
        assert "  - www.roblox.com: BLOCK (category: games)" in out, out
        assert "DNS answer: BLOCK, via www.roblox.com" in out, out
        fine = vigie("explain", "--rules", str(rules), "--client", "10.20.1.17", "--resolve", "--upstream",
                     f"127.0.0.1:{upstream.port}", "fine.pupil.example").stdout
        assert "DNS answer: ALLOW" in fine and "  - 192.0.2.1: in no blocking address list" in fine, fine
    silent = vigie("explain", "--rules", str(rules), "--client", "10.20.1.17", "--resolve", "--upstream",
                   f"127.0.0.1:{free_port()}", "fine.pupil.example")
    assert silent.returncode == 0 and "resolve: no answer from" in silent.stdout, silent.stdout
