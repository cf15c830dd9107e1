"""The teachers' page end to end: accounts made with `vigie teachers`, a real `vigie dns` serving the page over
HTTPS, headless Chromium signing in and locking a class while `dig` asks from a class address; HTTP clients for
what an attacker would try (no CSRF token, another teacher's class, password guessing)."""

from __future__ import annotations

import asyncio
import html
import http.cookiejar
import os
import re
import ssl
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.chromium import Chromium
from tests.conftest import REPO, free_port, write_tree
from tests.dns_servers import RULES_PREAMBLE, UpstreamServer, VigieProcess, dig

PASSWORDS = {"mme.martin": "tableau-noir-42", "m.durand": "craie-blanche-17"}
CLASS_A, CLASS_B = "127.0.0.21", "127.0.0.22"


def rules_text(teacher_port: int) -> str:
    return RULES_PREAMBLE + f"""
groups:
  cm2-a: {{addresses: [{CLASS_A}], profile: classe}}
  cm2-b: {{addresses: [{CLASS_B}], profile: classe}}
profiles:
  classe: {{block: [games], allow: [ent.example]}}
server:
  teacher: {{listen: 127.0.0.1:{teacher_port}}}
"""


def vigie(rules: Path, *args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vigie", *args, "--rules", str(rules)], cwd=REPO, input=password,
                          capture_output=True, text=True, timeout=60)


def add_teachers(rules: Path) -> None:
    for account, name, group in (("mme.martin", "Mme Martin", "cm2-a"), ("m.durand", "M. Durand", "cm2-b")):
        made = vigie(rules, "teachers", "add", account, "--name", name, "--groups", group, "--password-stdin",
                     password=PASSWORDS[account] + "\n")
        assert made.returncode == 0, made.stderr


def test_accounts_hold_a_hash_never_a_password_and_bad_input_is_refused(tmp_path: Path) -> None:
    rules = write_tree(tmp_path, {"rules.yaml": rules_text(free_port()), "games.txt": "roblox.com\n"})
    add_teachers(rules)
    accounts = tmp_path / "teachers.yaml"
    text = accounts.read_text()
    assert "scrypt$" in text and PASSWORDS["mme.martin"] not in text
    assert stat.S_IMODE(os.stat(accounts).st_mode) == 0o600
    assert "mme.martin" in vigie(rules, "teachers", "list").stdout
    short = vigie(rules, "teachers", "passwd", "mme.martin", "--password-stdin", password="court\n")
    assert short.returncode == 1 and "at least 10 characters" in short.stderr
    unknown = vigie(rules, "teachers", "add", "x.y", "--name", "X", "--groups", "cm2-aa", "--password-stdin",
                    password="un-long-mot-de-passe\n")
    assert unknown.returncode == 1 and "unknown group 'cm2-aa' (did you mean 'cm2-a'?)" in unknown.stderr
    assert vigie(rules, "check").returncode == 0
    accounts.write_text(text.replace("- cm2-a", "- cm2-z").replace(text.split("password: ")[1].split("\n")[0],
                                                                   "secret123", 1))
    checked = vigie(rules, "check")
    assert checked.returncode == 1
    assert re.search(r"teachers.yaml:\d+:\d+: teachers.mme.martin.groups\[0\]: unknown group 'cm2-z'",
                     checked.stderr), checked.stderr
    assert re.search(r"teachers.yaml:\d+:\d+: teachers.m.durand.password: not a password hash", checked.stderr)


class Page:
    """An HTTPS client of the page, as a browser: a cookie jar, Vigie's CA trusted."""

    def __init__(self, port: int, ca: Path) -> None:
        self.base = f"https://127.0.0.1:{port}"
        self.jar = http.cookiejar.CookieJar()
        context = ssl.create_default_context(cafile=str(ca))
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar),
                                                  urllib.request.HTTPSHandler(context=context))

    def request(self, path: str, form: dict[str, str] | None = None, *, csrf: bool = True) -> tuple[int, str]:
        data = None
        if form is not None:
            if csrf:
                form = {**form, "_xsrf": self.xsrf()}
            data = urllib.parse.urlencode(form).encode()
        try:
            with self.opener.open(self.base + path, data=data, timeout=20) as response:
                return response.status, html.unescape(response.read().decode())
        except urllib.error.HTTPError as error:
            return error.code, html.unescape(error.read().decode())

    def xsrf(self) -> str:
        if not any(cookie.name == "_xsrf" for cookie in self.jar):
            self.request("/connexion")
        return next(cookie.value for cookie in self.jar if cookie.name == "_xsrf") or ""

    def sign_in(self, account: str, password: str) -> tuple[int, str]:
        return self.request("/connexion", {"compte": account, "mot_de_passe": password})


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[VigieProcess, int, Path]]:
    port = free_port()
    rules = write_tree(tmp_path, {"rules.yaml": rules_text(port), "games.txt": "roblox.com\n"})
    add_teachers(rules)
    with UpstreamServer() as upstream, VigieProcess(rules, free_port(), upstream.port, free_port()) as dns:
        assert f"teachers' page on https://127.0.0.1:{port}/" in dns.output()
        yield dns, port, tmp_path / "var" / "ca" / "vigie-ca.pem"


def test_what_an_attacker_tries_is_refused(running: tuple[VigieProcess, int, Path]) -> None:
    dns, port, ca = running
    page = Page(port, ca)
    status, body = page.request("/classe/cm2-a")
    assert status == 200 and "Mot de passe" in body, "not signed in: the sign-in form"
    assert page.sign_in("mme.martin", "pas-le-bon-mot")[0] == 403
    assert page.sign_in("mme.martin", PASSWORDS["mme.martin"])[0] == 200
    assert page.request("/classe/cm2-a", {"action": "lock", "minutes": "30"}, csrf=False)[0] == 403, \
        "a forged form without the CSRF token"
    status, body = page.request("/classe/cm2-b")
    assert status == 403, "another teacher's class"
    assert page.request("/classe/cm2-b", {"action": "lock", "minutes": "30"})[0] == 403
    status, body = page.request("/classe/cm2-a", {"action": "open", "site": "dns.google", "minutes": "30"})
    assert status == 400 and "toujours bloquées" in body, "an always-blocked site cannot be opened"
    status, body = page.request("/classe/cm2-a", {"action": "open", "site": "pas un site", "minutes": "30"})
    assert status == 400 and "pas un nom de site" in body
    cookie = next(c for c in page.jar if c.name == "vigie_session")
    assert cookie.secure and cookie.has_nonstandard_attr("HttpOnly")
    changed = vigie(dns.log.parent / "rules.yaml", "teachers", "passwd", "mme.martin", "--password-stdin",
                    password="un-tout-nouveau-mot\n")
    assert changed.returncode == 0, changed.stderr
    status, body = page.request("/classe/cm2-a")
    assert "Mot de passe" in body and "Verrouiller" not in body, "a new password ends the open sessions"


def test_only_this_site_is_a_lock_and_an_opening_ended_together(running: tuple[VigieProcess, int, Path]) -> None:
    dns, port, ca = running
    rules = dns.log.parent / "rules.yaml"
    page = Page(port, ca)
    assert page.sign_in("mme.martin", PASSWORDS["mme.martin"])[0] == 200
    status, body = page.request("/classe/cm2-a", {"action": "only", "site": "Fr.Wikipedia.org", "minutes": "45"})
    assert status == 200 and "Seul fr.wikipedia.org est accessible." in body, body
    listed = vigie(rules, "override", "list").stdout
    assert "lock for group cm2-a" in listed and "allow fr.wikipedia.org for group cm2-a" in listed, listed
    assert asyncio.run(until_dig(dns.dns_port, "example.org", CLASS_A, "NXDOMAIN"))
    assert "status: NOERROR" in dig(dns.dns_port, "fr.wikipedia.org", "-b", CLASS_A)
    first = re.search(r'name="override" value="([^"]+)"', body)
    assert first
    status, body = page.request("/classe/cm2-a", {"action": "end", "override": first.group(1)})
    assert status == 200 and "C'est terminé." in body
    assert vigie(rules, "override", "list").stdout.strip() == "no override in force", "both ended together"


def test_password_guessing_is_slowed_then_refused(running: tuple[VigieProcess, int, Path]) -> None:
    _, port, ca = running
    page = Page(port, ca)
    for _ in range(5):
        assert page.sign_in("m.durand", "mauvais-mot-de-passe")[0] == 403
    started = time.monotonic()
    status, body = page.sign_in("m.durand", PASSWORDS["m.durand"])
    assert status == 429 and "Trop d'essais" in body, "the sixth attempt in a minute, even the right password"
    assert time.monotonic() - started >= 2, "and slowed"
    other = Page(port, ca)
    assert other.sign_in("mme.martin", PASSWORDS["mme.martin"])[0] == 429, "the same address for another account"


async def until_dig(port: int, name: str, source: str, status: str, seconds: float = 4) -> bool:
    """Whether `dig` from `source` gets `status` within `seconds` (the fronts read the store every second)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if f"status: {status}" in await asyncio.to_thread(dig, port, name, "-b", source):
            return True
        await asyncio.sleep(0.2)
    return False


def test_a_teacher_locks_her_class_from_chromium_and_dig_sees_it(running: tuple[VigieProcess, int, Path],
                                                                tmp_path: Path) -> None:
    dns, port, _ = running
    assert "status: NOERROR" in dig(dns.dns_port, "example.org", "-b", CLASS_A)

    async def lesson() -> list[Path]:
        shots = []
        async with Chromium(tmp_path / "profile", 768, 1024) as tablet:  # a tablet in portrait
            await tablet.open(f"https://127.0.0.1:{port}/")
            await tablet.fill("#compte", "mme.martin")
            await tablet.fill("#mot_de_passe", PASSWORDS["mme.martin"])
            shots.append(await tablet.screenshot(tmp_path / "sign-in-tablet.png"))
            await tablet.press("button[type=submit]")
            shown = await tablet.text()
            assert "Classe cm2-a" in shown and "Aucune dérogation en cours" in shown, shown
            await tablet.evaluate("document.querySelector('#minutes-lock').value = '20'")
            await tablet.press("button.danger")
            assert "La classe est verrouillée." in await tablet.text()
            shots.append(await tablet.screenshot(tmp_path / "locked-tablet.png"))
            assert await tablet.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), \
                "no sideways scrolling on a tablet"
            assert await until_dig(dns.dns_port, "example.org", CLASS_A, "NXDOMAIN"), \
                "the class's tablets get the lock's answer within seconds"
            assert "status: NOERROR" in dig(dns.dns_port, "ent.example", "-b", CLASS_A), "its allow list stays"
            assert "status: NOERROR" in dig(dns.dns_port, "example.org", "-b", CLASS_B), "the other class is free"
            listed = vigie(dns.log.parent / "rules.yaml", "override", "list")
            assert "lock for group cm2-a" in listed.stdout and "Mme Martin (mme.martin)" in listed.stdout
            await tablet.press("form input[name=override] ~ button")
            assert "C'est terminé." in await tablet.text()
        async with Chromium(tmp_path / "profile-pc", 1366, 768) as pc:  # the classroom PC
            await pc.open(f"https://127.0.0.1:{port}/connexion")
            await pc.fill("#compte", "mme.martin")
            await pc.fill("#mot_de_passe", PASSWORDS["mme.martin"])
            await pc.press("button[type=submit]")
            shots.append(await pc.screenshot(tmp_path / "class-pc.png"))
        return shots

    shots = asyncio.run(lesson())
    assert asyncio.run(until_dig(dns.dns_port, "example.org", CLASS_A, "NOERROR")), "the lock's end reaches DNS"
    for shot, size in zip(shots, [(768, 1024), (768, 1024), (1366, 768)], strict=True):
        image = Image.open(shot).convert("RGB")
        assert image.size == size
        header = [image.getpixel((x, 10)) for x in range(0, size[0], 16)]
        assert sum(1 for p in header if abs(p[0] - 0x0B) < 8 and abs(p[2] - 0xAD) < 8) > len(header) * 0.8, \
            f"{shot.name}: the blue header across the top"


def test_the_class_sees_what_was_blocked_as_counts_per_category(running: tuple[VigieProcess, int, Path]) -> None:
    dns, port, ca = running
    page = Page(port, ca)
    assert page.sign_in("mme.martin", PASSWORDS["mme.martin"])[0] == 200
    assert "Bloqué dans la dernière heure : rien" in page.request("/classe/cm2-a")[1]
    for name in ("roblox.com", "www.roblox.com", "roblox.com"):
        assert "status: NXDOMAIN" in dig(dns.dns_port, name, "-b", CLASS_A)
    assert "status: NXDOMAIN" in dig(dns.dns_port, "roblox.com", "-b", CLASS_B)  # the other class: not counted here
    time.sleep(6)  # a sample is taken at most every 5 s
    body = page.request("/classe/cm2-a")[1]
    assert "Bloqué dans la dernière heure : games 3" in body, body[body.find("<main>"):][:600]
    assert "roblox" not in body, "counts, never sites"
