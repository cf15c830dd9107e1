"""`vigie run` / `vigie dns`: start the fronts on one shared snapshot, and reload it when the files change.

A reload builds the new snapshot in a worker thread beside the old one, then swaps one reference: queries keep
being answered throughout, and an invalid edit leaves the old rules serving (logged, and counted in
`vigie_rules_reloads_total{result="invalid"}`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
import threading
import time
from pathlib import Path

from prometheus_client import start_http_server

from blocklists.errors import VigieError
from blocklists.sources import SourceSpec
from blocklists.update import UpdateResult, is_due, read_state, update_lock, update_source, updating_now
from dns_resolver.server import DnsFront, start_dns_servers
from dns_resolver.upstream import UpstreamPool
from filter_proxy.addon import VigieAddon
from filter_proxy.ca import ensure_ca
from filter_proxy.server import start_proxy
from policy.errors import ConfigError
from policy.loader import load_rules, parse_listen
from policy.metrics import LIST_DOMAINS, LIST_LAST_SUCCESS, RELOADS, RULES_GENERATION, RULES_LOADED_AT
from policy.model import DnsSettings, ServerSettings
from policy.snapshot import ListCache, Snapshot
from policy.state import EMPTY_STATE, StateView
from vigie.lists_cli import describe, record, remote_specs
from vigie.loading import load_snapshot, watched_files

log = logging.getLogger(__name__)
WATCH_INTERVAL_SECONDS = 2.0
REFRESH_CHECK_SECONDS = 60.0


class SnapshotHolder:
    """The one reference every front reads (`holder.snapshot`); only `reload` replaces it."""

    def __init__(self, rules_path: Path) -> None:
        self.rules_path = rules_path
        self.cache = ListCache()
        self._reloading = threading.Lock()
        self.snapshot = self._load(1)
        self._stamps = self._file_stamps()
        self._published()

    def _load(self, generation: int) -> Snapshot:
        loaded = load_snapshot(self.rules_path, self.cache, generation)
        for warning in loaded.warnings:
            log.warning("%s", warning)
        return loaded.snapshot

    def _file_stamps(self) -> dict[Path, tuple[int, int]]:
        stamps = {}
        for path in watched_files(self.snapshot):
            try:
                stat = path.stat()
                stamps[path] = (stat.st_mtime_ns, stat.st_size)
            except OSError:
                stamps[path] = (-1, -1)
        return stamps

    def changed(self) -> bool:
        return self._file_stamps() != self._stamps

    def reload(self) -> bool:
        """Build and swap a new snapshot; on any problem keep the current one. Returns whether it swapped."""
        with self._reloading:
            return self._reload()

    def _reload(self) -> bool:
        started = time.monotonic()
        stamps = self._file_stamps()
        try:
            new = self._load(self.snapshot.generation + 1)
        except ConfigError as exc:
            self._stamps = stamps  # do not retry the same broken files every two seconds
            RELOADS.labels("invalid").inc()
            log.error("rules reload refused, the previous rules keep serving:\n%s", exc)
            return False
        except VigieError as exc:
            self._stamps = stamps
            RELOADS.labels("invalid").inc()
            log.error("rules reload refused, the previous rules keep serving: %s", exc)
            return False
        self.snapshot = new
        self._stamps = self._file_stamps()
        RELOADS.labels("ok").inc()
        self._published()
        log.info("rules reloaded: generation %d in %.2f s", new.generation, time.monotonic() - started)
        return True

    def _published(self) -> None:
        RULES_GENERATION.set(self.snapshot.generation)
        RULES_LOADED_AT.set(time.time())
        LIST_DOMAINS.set(len(self.snapshot.lists.domains))


def add_run_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for name, help_text, fronts in (("run", "run the DNS resolver and the HTTP(S) proxy (and metrics)", "dns proxy"),
                                    ("dns", "run only the DNS resolver", "dns"),
                                    ("proxy", "run only the HTTP(S) proxy", "proxy")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("--rules", type=Path, default=Path("rules.yaml"))
        if "dns" in fronts:
            command.add_argument("--dns-listen", action="append", help="address:port (overrides server.dns.listen)")
            command.add_argument("--upstream", action="append",
                                 help="address:port (overrides server.dns.upstreams)")
        if "proxy" in fronts:
            command.add_argument("--proxy-listen", help="address:port (overrides server.proxy.listen)")
            command.add_argument("--proxy-mode", choices=("regular", "transparent"),
                                 help="overrides server.proxy.mode")
            command.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                                 help="a mitmproxy option, e.g. --set ssl_verify_upstream_trusted_ca=/path/ca.pem")
        command.add_argument("--metrics-listen", help="address:port, or `off` (overrides server.metrics.listen)")
        command.set_defaults(handler=run_services, fronts=fronts.split())
    ca = commands.add_parser("ca", help="create the proxy's certificate authority if needed and show its files")
    ca.add_argument("--rules", type=Path, default=Path("rules.yaml"))
    ca.set_defaults(handler=run_ca)


@dataclasses.dataclass(frozen=True)
class Fronts:
    """What to start, with the command line's overrides applied."""

    dns: DnsSettings | None
    proxy_listen: str | None
    proxy_mode: str
    proxy_options: tuple[str, ...]
    metrics_listen: str | None


def _fronts(args: argparse.Namespace, settings: ServerSettings) -> Fronts:
    try:
        dns = None
        if "dns" in args.fronts:
            dns = settings.dns
            if args.dns_listen:
                dns = dataclasses.replace(dns, listen=tuple(parse_listen(v) for v in args.dns_listen))
            if args.upstream:
                dns = dataclasses.replace(dns, upstreams=tuple(parse_listen(v) for v in args.upstream))
        proxy_listen = None
        if "proxy" in args.fronts:
            proxy_listen = parse_listen(args.proxy_listen) if args.proxy_listen else settings.proxy_listen
        metrics_listen = None if args.metrics_listen == "off" else \
            parse_listen(args.metrics_listen) if args.metrics_listen else settings.metrics_listen
    except ValueError as exc:
        raise VigieError(f"bad address on the command line: {exc} (example: 127.0.0.1:5353)") from None
    return Fronts(dns, proxy_listen, getattr(args, "proxy_mode", None) or settings.proxy_mode,
                  tuple(getattr(args, "set", ())), metrics_listen)


def run_services(args: argparse.Namespace) -> int:
    try:
        holder = SnapshotHolder(args.rules)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{args.rules}: cannot start (run `vigie check {args.rules}`)", file=sys.stderr)
        return 1
    # Listening addresses are read once at start: changing them needs a restart (said in the README).
    return asyncio.run(_serve(holder, _fronts(args, holder.snapshot.rules.server)))


def run_ca(args: argparse.Namespace) -> int:
    rules = load_rules(args.rules).rules
    files = ensure_ca(Path(rules.server.data_dir))
    print(f"{'created' if files.created else 'existing'} certificate authority, key in {files.confdir} "
          "(keep it secret: mode 0700)")
    print(f"certificate for the MDM: {files.pem} (PEM), {files.der} (DER)")
    print(f"SHA-256 fingerprint: {files.sha256}")
    return 0


async def _serve(holder: SnapshotHolder, fronts: Fronts) -> int:
    loop = asyncio.get_running_loop()
    state: StateView = EMPTY_STATE
    listening: list[str] = []
    dns_servers: list[asyncio.AbstractServer | asyncio.BaseTransport] = []
    proxy = None
    if fronts.dns is not None:
        front = DnsFront(lambda: holder.snapshot, lambda: state, UpstreamPool(fronts.dns.upstreams))
        dns_servers = await start_dns_servers(front, fronts.dns.listen)
        listening.append(f"DNS on {', '.join(fronts.dns.listen)} (UDP+TCP), upstreams "
                         f"{', '.join(fronts.dns.upstreams)}")
    if fronts.proxy_listen is not None:
        settings = holder.snapshot.rules.server
        ca = ensure_ca(Path(settings.data_dir))
        addon = VigieAddon(lambda: holder.snapshot, lambda: state, block_page_for_https=settings.https_block_page)
        proxy = await start_proxy(addon, fronts.proxy_listen, fronts.proxy_mode, ca.confdir, fronts.proxy_options)
        listening.append(f"proxy on {fronts.proxy_listen} ({fronts.proxy_mode}; CA certificate {ca.pem})")
    metrics = "off"
    if fronts.metrics_listen:
        host, _, port = fronts.metrics_listen.rpartition(":")
        start_http_server(int(port), addr=host.strip("[]"))
        metrics = f"http://{fronts.metrics_listen}/metrics"
    stop = asyncio.Event()
    reload_now = asyncio.Event()
    update_now = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_now.set)
    loop.add_signal_handler(signal.SIGUSR1, update_now.set)
    snapshot = holder.snapshot
    print(f"vigie: {'; '.join(listening)}; metrics {metrics}; rules {snapshot.rules.source} "
          f"({len(snapshot.rules.groups)} groups, {len(snapshot.lists.domains)} listed domains); "
          "reload: edit the files or send SIGHUP; update the lists: SIGUSR1", flush=True)
    tasks = [asyncio.create_task(_watch(holder, reload_now)), asyncio.create_task(_refresh_lists(holder, update_now))]
    await stop.wait()
    for task in tasks:
        task.cancel()
    for item in dns_servers:
        item.close()
    if proxy is not None:
        await proxy.stop()
    log.info("stopped")
    return 0


async def _watch(holder: SnapshotHolder, reload_now: asyncio.Event) -> None:
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(reload_now.wait(), WATCH_INTERVAL_SECONDS)
        forced = reload_now.is_set()
        reload_now.clear()
        if updating_now(Path(holder.snapshot.rules.server.data_dir) / "lists"):
            continue  # the updater reloads (or `vigie lists update` compiles) once its downloads are checked
        if forced or holder.changed():
            await asyncio.to_thread(holder.reload)


async def _refresh_lists(holder: SnapshotHolder, update_now: asyncio.Event) -> None:
    """Update the remote lists when due (server.lists.refresh, default daily) or at SIGUSR1."""
    for spec in remote_specs(holder.snapshot.rules):
        state = read_state(spec)
        if state.checked_at:
            LIST_LAST_SUCCESS.labels(spec.name).set(state.checked_at)
    while True:  # checked at start too: a fresh install downloads its lists at once
        forced = update_now.is_set()
        update_now.clear()
        rules = holder.snapshot.rules
        due = [s for s in remote_specs(rules) if forced or is_due(s, rules.server.list_updates, time.time())]
        if due:
            await asyncio.to_thread(_update_and_reload, holder, due)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(update_now.wait(), REFRESH_CHECK_SECONDS)


def _update_and_reload(holder: SnapshotHolder, specs: list[SourceSpec]) -> None:
    rules = holder.snapshot.rules
    with update_lock(Path(rules.server.data_dir) / "lists", wait=False) as held:
        if not held:
            log.info("list update skipped: another process is updating the lists")
            return
        outcomes = [update_source(spec, rules.server.list_updates) for spec in specs]
        for outcome, spec in zip(outcomes, specs, strict=True):
            record(outcome, spec)
            log.log(logging.WARNING if outcome.result is UpdateResult.FAILED else logging.INFO, "list %s",
                    describe(outcome))
        if any(o.result is UpdateResult.UPDATED for o in outcomes):
            holder.reload()  # still holding the lock: other processes wait, then map what this one compiled
