"""The teachers' page: a teacher signs in from the classroom and opens a site, locks the class, or leaves only one
site for the lesson; she sees what is in force for her classes. Served by Vigie's main process over HTTPS
(tornado, already installed with mitmproxy), off unless `server.teacher.listen` is set.

What each action becomes is an ordinary override in the state store, with the teacher as its author, so the
fronts apply it within seconds and the admin sees it in `vigie override list`:
  open a site → allow <site> · lock → lock (only the profile's allow list) · only this site → lock + allow <site>
Security: sessions in memory (idle 30 min, at most 9 h), cookies Secure, HttpOnly, SameSite=Strict; tornado's
XSRF token on every form; at most 5 failed sign-ins per minute per account and per address (then slowed and
refused); `allow_networks` may keep the pupils' networks out; no script, no external resource.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import logging
import secrets
import ssl
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import tornado.httpserver
import tornado.web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from prometheus_client.parser import text_string_to_metric_families

from blocklists.errors import NameRejected, VigieError
from blocklists.names import normalize_domain
from filter_proxy.block_page import preferred_language
from policy.errors import ConfigError
from policy.model import TeacherSettings
from policy.snapshot import Snapshot
from policy.state import Override, OverrideKind
from policy.state_store import OverrideNotFound, StateStore, StoreUnavailable
from vigie.overrides import OverrideRefused, OverrideRequest, budgets_now, make_override, usage_report
from vigie.teacher_html import class_values, render
from vigie.teachers import Teacher, load_teachers, verify_password

log = logging.getLogger(__name__)

SESSION_COOKIE = "vigie_session"
SESSION_IDLE_SECONDS = 30 * 60
SESSION_MAX_SECONDS = 9 * 3600  # a school day
FAILURES_PER_MINUTE = 5  # per account and per address; the next attempts wait, then are refused
SLOW_DOWN_SECONDS = 2.0
DEFAULT_MINUTES = 55  # a lesson
MAX_MINUTES = 8 * 60  # longer belongs to the IT department
MAX_TRACKED = 10_000  # accounts and addresses whose failed sign-ins are remembered
ONLY_NOTE = "seulement "  # the note of the two overrides an "only this site" makes: ended together


@dataclass
class Session:
    account: str
    password_hash: str  # a new password ends the sessions opened with the old one
    started: float
    seen: float

    def alive(self, now: float) -> bool:
        return now - self.seen <= SESSION_IDLE_SECONDS and now - self.started <= SESSION_MAX_SECONDS


@dataclass
class Failures:
    """Failed sign-ins in the current minute, per account and per address."""

    by_key: dict[str, list[float]] = field(default_factory=dict)

    def too_many(self, *keys: str) -> bool:
        now = time.monotonic()
        return any(len([t for t in self.by_key.get(key, []) if now - t < 60]) >= FAILURES_PER_MINUTE for key in keys)

    def add(self, *keys: str) -> None:
        now = time.monotonic()
        if len(self.by_key) > MAX_TRACKED:  # many names tried: forget those whose minute is over
            self.by_key = {key: times for key, times in self.by_key.items() if now - times[-1] < 60}
        for key in keys:
            self.by_key[key] = [t for t in self.by_key.get(key, []) if now - t < 60] + [now]


BLOCK_SERIES = ("vigie_dns_queries_total", "vigie_proxy_requests_total")
BLOCK_WINDOW_SECONDS = 3600
SAMPLE_SECONDS = 60


class RecentBlocks:
    """What was blocked for each class in the last hour, as counts per category — never sites, never tablets.
    Read from the metrics every Vigie process already serves (the DNS and proxy workers each count their own):
    a sample of the totals every minute, the window's count is the newest minus the oldest."""

    def __init__(self, endpoints: tuple[str, ...]) -> None:
        self.endpoints = endpoints  # http://host:port/metrics of every process
        self.samples: collections.deque[tuple[float, dict[tuple[str, str], float]]] = collections.deque()

    def sample(self) -> None:
        totals: dict[tuple[str, str], float] = {}
        for url in self.endpoints:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    text = response.read().decode()
            except OSError:
                continue  # a worker restarting: its counts come back with it
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name in BLOCK_SERIES and sample.labels.get("action") == "block":
                        key = (sample.labels.get("group", ""), sample.labels.get("category", "none"))
                        totals[key] = totals.get(key, 0.0) + sample.value
        now = time.monotonic()
        self.samples.append((now, totals))
        while len(self.samples) > 2 and now - self.samples[1][0] >= BLOCK_WINDOW_SECONDS:
            self.samples.popleft()

    def for_group(self, group: str) -> list[tuple[str, int]]:
        """(category, blocked requests) in the window, most first; `none` is a block without a category (a lock,
        a schedule, a deny list)."""
        if not self.samples:
            return []
        oldest, newest = self.samples[0][1], self.samples[-1][1]
        counts = [(category, int(total - oldest.get((g, category), 0.0)))  # a restarted worker counts from 0
                  for (g, category), total in newest.items() if g == group]
        return sorted(((c, n) for c, n in counts if n > 0), key=lambda item: (-item[1], item[0]))

    def fresh(self) -> None:
        """A new sample unless one is a few seconds old: the page shows what was just blocked."""
        if self.endpoints and (not self.samples or time.monotonic() - self.samples[-1][0] > 5):
            self.sample()

    async def run(self) -> None:
        while True:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(SAMPLE_SECONDS)


class TeacherPage:
    """The page's server, its sessions and the accounts (read again when the file changes)."""

    def __init__(self, settings: TeacherSettings, snapshot: Callable[[], Snapshot],
                 open_store: Callable[[], StateStore], data_dir: Path, metrics: tuple[str, ...] = ()) -> None:
        self.settings = settings
        self.blocks = RecentBlocks(metrics)
        self._sampler: asyncio.Task[None] | None = None
        self.snapshot = snapshot
        self._open_store = open_store
        self._store: StateStore | None = None
        self.data_dir = data_dir
        self.sessions: dict[str, Session] = {}
        self.failures = Failures()
        self._accounts: tuple[float, dict[str, Teacher]] = (-1.0, {})
        self._server: tornado.httpserver.HTTPServer | None = None

    @property
    def store(self) -> StateStore:
        if self._store is None:
            self._store = self._open_store()
        return self._store

    def teachers(self) -> dict[str, Teacher]:
        """The accounts, read again when the file changed; the last good ones if an edit broke it."""
        path = Path(self.settings.accounts)
        try:
            stamp = path.stat().st_mtime
        except OSError:
            return {}
        if stamp != self._accounts[0]:
            try:
                self._accounts = (stamp, load_teachers(path, self.snapshot().rules))
            except ConfigError as exc:
                log.error("teacher accounts not reloaded, the previous ones stay: %s", exc)
                self._accounts = (stamp, self._accounts[1])
        return self._accounts[1]

    def start(self) -> None:
        listen = self.settings.listen
        assert listen is not None
        app = tornado.web.Application(
            [(r"/", HomeHandler, {"page": self}), (r"/connexion", LoginHandler, {"page": self}),
             (r"/deconnexion", LogoutHandler, {"page": self}),
             (r"/classe/([a-z0-9._-]+)", ClassHandler, {"page": self})],
            xsrf_cookies=True, xsrf_cookie_kwargs={"secure": True, "httponly": True, "samesite": "Strict"},
            login_url="/connexion", compress_response=True)
        self._server = tornado.httpserver.HTTPServer(app, ssl_options=self._tls(), xheaders=False)
        try:
            self._server.listen(listen.port, listen.host)
        except OSError as exc:
            raise VigieError(f"the teachers' page cannot listen on {listen}: {exc.strerror} (set "
                             "server.teacher.listen)") from None
        if self.blocks.endpoints:
            self._sampler = asyncio.create_task(self.blocks.run())

    def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        if self._server is not None:
            self._server.stop()
        if self._store is not None:
            self._store.close()

    def _tls(self) -> ssl.SSLContext:
        """The admin's certificate, or one from Vigie's CA (which the MDM made the tablets and PCs trust)."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        if self.settings.certificate and self.settings.key:
            try:
                context.load_cert_chain(self.settings.certificate, self.settings.key)
            except (OSError, ssl.SSLError) as exc:
                raise VigieError(f"server.teacher.certificate / key: cannot use them ({exc})") from None
            return context
        certificate, key = vigie_ca_certificate(self.data_dir, self.settings.listen.host if self.settings.listen
                                                else "127.0.0.1")
        context.load_cert_chain(certificate, key)
        return context


def vigie_ca_certificate(data_dir: Path, host: str) -> tuple[Path, Path]:
    """A certificate for the page's address (and `vigie`, `localhost`) signed by Vigie's CA, in data_dir."""
    from mitmproxy.certs import CertStore

    from filter_proxy.ca import MITMPROXY_BASENAME, ensure_ca

    ca = ensure_ca(data_dir)
    store = CertStore.from_store(ca.confdir, MITMPROXY_BASENAME, 2048)
    names: list[x509.GeneralName] = [x509.DNSName("vigie"), x509.DNSName("localhost")]
    try:
        address = ipaddress.ip_address(host)
        if not address.is_unspecified:
            names.append(x509.IPAddress(address))
    except ValueError:
        names.append(x509.DNSName(host))
    entry = store.get_cert("vigie", names, organization="Vigie")
    directory = data_dir / "teacher-tls"
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    certificate, key = directory / "certificate.pem", directory / "key.pem"
    certificate.write_bytes(entry.cert.to_pem())
    key.touch(mode=0o600)
    key.write_bytes(entry.privatekey.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return certificate, key


class PageHandler(tornado.web.RequestHandler):
    page: TeacherPage

    def initialize(self, page: TeacherPage) -> None:
        self.page = page

    def prepare(self) -> None:
        networks = self.page.settings.allow_networks
        if networks:
            address = ipaddress.ip_address(self.request.remote_ip or "0.0.0.0")
            if not any(address in network for network in networks):
                raise tornado.web.HTTPError(403, reason="not from here")

    def set_default_headers(self) -> None:
        self.set_header("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
                                                   "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
        self.set_header("Cache-Control", "no-store")
        self.set_header("Referrer-Policy", "no-referrer")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Strict-Transport-Security", "max-age=31536000")

    @property
    def language(self) -> str:
        return preferred_language(self.request.headers.get("Accept-Language"))

    def get_current_user(self) -> Teacher | None:
        token = self.get_cookie(SESSION_COOKIE)
        session = self.page.sessions.get(token or "")
        now = time.monotonic()
        if session is None or not session.alive(now):
            if token:
                self.page.sessions.pop(token, None)
            return None
        teacher = self.page.teachers().get(session.account)
        if teacher is None or teacher.password_hash != session.password_hash:  # removed, or a new password
            self.page.sessions.pop(token or "", None)
            return None
        session.seen = now
        return teacher

    def show(self, name: str, status: int = 200, **values: object) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Content-Language", self.language)
        self.finish(render(name, self.language, xsrf=self.xsrf_form_html(), teacher=self.current_user, **values))

    def write_error(self, status_code: int, **kwargs: object) -> None:
        self.show("error", status_code, code=status_code)


class LoginHandler(PageHandler):
    def get(self) -> None:
        self.show("login", message=None)

    async def post(self) -> None:
        account = (self.get_body_argument("compte", "") or "").strip().lower()[:40]
        password = self.get_body_argument("mot_de_passe", "") or ""
        keys = (f"account:{account}", f"address:{self.request.remote_ip}")
        if self.page.failures.too_many(*keys):
            await asyncio.sleep(SLOW_DOWN_SECONDS)
            self.page.failures.add(*keys)
            log.warning("teachers' page: too many sign-in attempts for %s from %s", account, self.request.remote_ip)
            self.show("login", 429, message="too_many")
            return
        teacher = self.page.teachers().get(account)
        # The hash is checked even for an unknown account, so that timing does not tell which accounts exist.
        stored = teacher.password_hash if teacher else UNKNOWN_ACCOUNT_HASH
        if not await asyncio.to_thread(verify_password, password, stored) or teacher is None:
            self.page.failures.add(*keys)
            self.show("login", 403, message="wrong")
            return
        token = secrets.token_urlsafe(32)
        now = time.monotonic()
        self.page.sessions = {key: session for key, session in self.page.sessions.items() if session.alive(now)}
        self.page.sessions[token] = Session(teacher.account, teacher.password_hash, now, now)
        self.set_cookie(SESSION_COOKIE, token, secure=True, httponly=True, samesite="Strict", path="/")
        log.info("teachers' page: %s signed in", teacher.account)
        self.redirect("/")


class LogoutHandler(PageHandler):
    def post(self) -> None:
        self.page.sessions.pop(self.get_cookie(SESSION_COOKIE) or "", None)
        self.clear_cookie(SESSION_COOKIE, path="/")
        self.redirect("/connexion")


class HomeHandler(PageHandler):
    @tornado.web.authenticated
    def get(self) -> None:
        teacher = self.current_user
        assert isinstance(teacher, Teacher)
        if len(teacher.groups) == 1:
            self.redirect(f"/classe/{teacher.groups[0]}")
            return
        self.show("home", groups=teacher.groups)


class ClassHandler(PageHandler):
    def _group(self, group: str) -> Teacher:
        teacher = self.current_user
        if not isinstance(teacher, Teacher):
            raise tornado.web.HTTPError(403)
        if group not in teacher.groups or group not in self.page.snapshot().rules.groups:
            raise tornado.web.HTTPError(403, reason="not your class")
        return teacher

    @tornado.web.authenticated
    async def get(self, group: str) -> None:
        self._group(group)
        await self._show(group, None)

    @tornado.web.authenticated
    async def post(self, group: str) -> None:
        teacher = self._group(group)
        action = self.get_body_argument("action", "") or ""
        site = (self.get_body_argument("site", "") or "").strip()
        try:
            minutes = int(self.get_body_argument("minutes", str(DEFAULT_MINUTES)) or DEFAULT_MINUTES)
        except ValueError:
            minutes = 0
        try:
            if action == "end":
                await asyncio.to_thread(self._end, teacher, group, self.get_body_argument("override", "") or "")
                outcome = "ended"
            elif action in ("open", "lock", "only"):
                if not 1 <= minutes <= MAX_MINUTES:
                    raise OverrideRefused("minutes")
                site = await asyncio.to_thread(self._make, teacher, group, action, site, minutes)
                outcome = action
            else:
                raise tornado.web.HTTPError(400)
        except OverrideRefused as exc:
            await self._show(group, ("refused", str(exc)), 400)
            return
        except StoreUnavailable:
            await self._show(group, ("store_down", ""), 503)
            return
        log.info("teachers' page: %s: %s %s for %s (%d min)", teacher.account, action, site or "-", group, minutes)
        await self._show(group, (outcome, site))

    def _make(self, teacher: Teacher, group: str, action: str, site: str, minutes: int) -> str:
        """Make the overrides of `action`; the site as it was understood (`Fr.Wikipedia.org.` → fr.wikipedia.org)."""
        snapshot = self.page.snapshot()
        now = datetime.now(UTC)
        domain = None
        if action in ("open", "only"):
            try:
                domain = normalize_domain(site)
            except NameRejected:
                raise OverrideRefused("not_a_site") from None
            if snapshot.lists.lookup_domain(domain) & snapshot.always_block_mask:
                raise OverrideRefused("always_blocked")
        author = f"{teacher.name} ({teacher.account})"
        note = {"open": f"ouvert pour la séance: {domain}", "lock": "classe verrouillée",
                "only": f"{ONLY_NOTE}{domain}"}[action]
        kinds = {"open": [OverrideKind.ALLOW], "lock": [OverrideKind.LOCK],
                 "only": [OverrideKind.LOCK, OverrideKind.ALLOW]}[action]
        for kind in kinds:
            override = make_override(OverrideRequest(kind, group, None, domain if kind is OverrideKind.ALLOW else None,
                                                      f"{minutes}m", note, author), snapshot.rules, now)
            self.page.store.add_override(override)
        return domain or ""

    def _end(self, teacher: Teacher, group: str, override_id: str) -> None:
        in_force = self.page.store.overrides(datetime.now(UTC))
        chosen = next((o for o in in_force if o.id == override_id and o.group == group), None)
        if chosen is None:
            raise OverrideRefused("not_found")
        together = [o for o in in_force if o.group == group and o.note == chosen.note and o.author == chosen.author
                    and o.created_at == chosen.created_at] if chosen.note.startswith(ONLY_NOTE) else [chosen]
        for override in together:
            with contextlib.suppress(OverrideNotFound):  # ended meanwhile
                self.page.store.clear_override(override.id)
        log.info("teachers' page: %s ended %s", teacher.account, ", ".join(o.id for o in together))

    async def _show(self, group: str, outcome: tuple[str, str] | None, status: int = 200) -> None:
        facts = await asyncio.to_thread(self._facts, group)
        self.show("class", status, group=group, default_minutes=DEFAULT_MINUTES,
                  **class_values(self.language, facts, outcome))

    def _facts(self, group: str) -> dict[str, object]:
        snapshot = self.page.snapshot()
        now = datetime.now(UTC)
        zone = snapshot.clock.zone
        in_force = snapshot.profile_in_force(group, now)
        overrides: list[Override] = []
        usage = None
        try:
            overrides = [o for o in self.page.store.overrides(now) if o.group == group]
            today = now.astimezone(zone).date()
            report = usage_report(snapshot.rules, self.page.store.usage(today), today, budgets_now(snapshot.rules, now))
            usage = next((g for g in report.groups if g.group == group), None)
        except StoreUnavailable:
            pass
        self.page.blocks.fresh()
        return {"profile": in_force.profile,
                "until": in_force.until.astimezone(zone) if in_force.until else None,
                "overrides": [(o, o.expires_at.astimezone(zone))
                              for o in sorted(overrides, key=lambda o: o.expires_at)],
                "usage": usage, "blocks": self.page.blocks.for_group(group),
                "blocks_known": bool(self.page.blocks.endpoints)}


# A real hash of a random password: an unknown account costs the same scrypt as a known one.
UNKNOWN_ACCOUNT_HASH = "scrypt$32768$8$1$AAAAAAAAAAAAAAAAAAAAAA==$" + "A" * 86 + "=="
