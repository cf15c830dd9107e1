"""`vigie run` / `vigie dns` / `vigie proxy`: start the fronts on one shared snapshot, reload it when the files
change, refresh the downloaded lists on schedule.

A reload builds the new snapshot in a worker thread beside the old one, then swaps one reference: queries keep
being answered throughout, and an invalid edit leaves the old rules serving (logged, and counted in
`vigie_rules_reloads_total{result="invalid"}`). With `dns.workers` > 1, extra processes share the DNS sockets;
each reloads by itself, and the main one also runs the proxy and the list updates.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import importlib.metadata
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import uvloop
from prometheus_client import start_http_server

from blocklists.errors import VigieError
from blocklists.sources import SourceSpec
from blocklists.update import UpdateResult, is_due, read_state, update_lock, update_source, updating_now
from dns_resolver.budget import CacheBudget
from dns_resolver.server import DnsFront
from dns_resolver.transport import Closable, ListenError, bind_udp, start_dns_servers
from dns_resolver.upstream import UpstreamPool
from policy.errors import ConfigError
from policy.loader import load_rules, parse_listen, parse_workers
from policy.metrics import (
    BUILD,
    LIST_DOMAINS,
    LIST_LAST_SUCCESS,
    RELOADS,
    RULES_GENERATION,
    RULES_LAST_RELOAD_OK,
    RULES_LOADED_AT,
    RULES_RELOAD_SECONDS,
)
from policy.model import DnsSettings, ServerSettings, SocketAddress
from policy.snapshot import ListCache, Snapshot
from policy.state_keeper import StateKeeper
from policy.state_store import open_store
from policy.usage_metrics import register_screen_time_metrics
from vigie.lists_cli import describe, record, remote_specs
from vigie.loading import load_snapshot, watched_files

log = logging.getLogger(__name__)
WATCH_INTERVAL_SECONDS = 2.0
REFRESH_CHECK_SECONDS = 60.0
FREEZE_EVERY_SECONDS = 5.0
THAW_EVERY_SECONDS = 3600.0
THAW_WITH_PROXY_SECONDS = 60.0
MAIN = "main"  # the role of the process started by `vigie run`


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
            RULES_LAST_RELOAD_OK.set(0)
            log.error("rules reload refused, the previous rules keep serving:\n%s", exc)
            return False
        except VigieError as exc:
            self._stamps = stamps
            RELOADS.labels("invalid").inc()
            RULES_LAST_RELOAD_OK.set(0)
            log.error("rules reload refused, the previous rules keep serving: %s", exc)
            return False
        self.snapshot = new
        self._stamps = self._file_stamps()
        RELOADS.labels("ok").inc()
        RULES_RELOAD_SECONDS.set(time.monotonic() - started)
        self._published()
        log.info("rules reloaded: generation %d in %.2f s", new.generation, time.monotonic() - started)
        return True

    def _published(self) -> None:
        RULES_LAST_RELOAD_OK.set(1)
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
            command.add_argument("--workers", help="DNS worker processes, or `auto` (overrides server.dns.workers)")
        if "proxy" in fronts:
            command.add_argument("--proxy-listen", help="address:port (overrides server.proxy.listen)")
            command.add_argument("--proxy-workers",
                                 help="proxy worker processes, or `auto` (overrides server.proxy.workers)")
            command.add_argument("--proxy-mode", choices=("regular", "transparent"),
                                 help="overrides server.proxy.mode")
            command.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                                 help="a mitmproxy option, e.g. --set ssl_verify_upstream_trusted_ca=/path/ca.pem")
        command.add_argument("--metrics-listen", help="address:port, or `off` (overrides server.metrics.listen)")
        command.add_argument("--api-listen", help="address:port, or `off` (overrides server.api.listen)")
        command.set_defaults(handler=run_services, fronts=fronts.split())
    ca = commands.add_parser("ca", help="create the proxy's certificate authority if needed and show its files")
    ca.add_argument("--rules", type=Path, default=Path("rules.yaml"))
    ca.set_defaults(handler=run_ca)


@dataclasses.dataclass(frozen=True)
class Fronts:
    """What to start, with the command line's overrides applied."""

    dns: DnsSettings | None
    proxy_listen: SocketAddress | None
    proxy_mode: str
    proxy_options: tuple[str, ...]
    proxy_workers: int
    metrics_listen: SocketAddress | None
    api_listen: SocketAddress | None
    role: str = MAIN  # the main process (DNS, proxy, admin API, list updates), or an extra worker: `dns-1`, `proxy-1`
    udp_sockets: list[socket.socket] | None = None  # bound before forking, shared by the DNS workers
    proxy_socket: socket.socket | None = None  # bound before forking, shared by the proxy workers


def _fronts(args: argparse.Namespace, settings: ServerSettings) -> Fronts:
    try:
        dns = None
        if "dns" in args.fronts:
            dns = settings.dns
            if args.dns_listen:
                dns = dataclasses.replace(dns, listen=tuple(parse_listen(v) for v in args.dns_listen))
            if args.upstream:
                dns = dataclasses.replace(dns, upstreams=tuple(SocketAddress.parse(v, 53) for v in args.upstream))
            if args.workers:
                dns = dataclasses.replace(dns, workers=parse_workers(args.workers))
        proxy_listen, proxy_workers = None, settings.proxy_workers
        if "proxy" in args.fronts:
            proxy_listen = parse_listen(args.proxy_listen) if args.proxy_listen else settings.proxy_listen
            if args.proxy_workers:
                proxy_workers = parse_workers(args.proxy_workers)
        metrics_listen = None if args.metrics_listen == "off" else \
            parse_listen(args.metrics_listen) if args.metrics_listen else settings.metrics_listen
        api_listen = None if args.api_listen == "off" else \
            parse_listen(args.api_listen) if args.api_listen else settings.api.listen
    except ValueError as exc:
        raise VigieError(f"bad value on the command line: {exc} (example: --dns-listen 127.0.0.1:5353, "
                         "--workers 2)") from None
    return Fronts(dns, proxy_listen, getattr(args, "proxy_mode", None) or settings.proxy_mode,
                  tuple(getattr(args, "set", ())), proxy_workers, metrics_listen, api_listen)


def run_services(args: argparse.Namespace) -> int:
    try:
        holder = SnapshotHolder(args.rules)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{args.rules}: cannot start (run `vigie check {args.rules}`)", file=sys.stderr)
        return 1
    # Listening addresses are read once at start: changing them needs a restart (said in docs/rules.md).
    fronts = _fronts(args, holder.snapshot.rules.server)
    workers = []
    try:
        # Every listening socket is bound here, before any fork: an address in use is said once, and the workers
        # of a front share its sockets (whichever is free takes the next query or connection).
        if fronts.dns and fronts.dns.workers > 1:
            fronts = dataclasses.replace(fronts, udp_sockets=bind_udp(fronts.dns.listen))
        if fronts.proxy_listen is not None:
            from filter_proxy.listen import bind_proxy_socket

            fronts = dataclasses.replace(fronts, proxy_socket=bind_proxy_socket(fronts.proxy_listen))
        workers = _start_workers(holder, fronts)
        return uvloop.run(_serve(holder, fronts, workers))
    except ListenError as exc:
        raise VigieError(f"{exc} (is another DNS server there? Ports under 1024 need root or "
                         "CAP_NET_BIND_SERVICE; set server.dns.listen or --dns-listen)") from None
    finally:
        _stop_workers(workers)


def _start_workers(holder: SnapshotHolder, fronts: Fronts) -> list[int]:
    """Fork the extra workers: DNS workers (`dns.workers` - 1), then proxy workers (`proxy.workers` - 1); the main
    process is the first of each. A DNS worker reads the UDP sockets bound before the fork and listens on TCP with
    SO_REUSEPORT; a proxy worker accepts on the proxy's socket bound before the fork. Each maps the same compiled
    lists, watches the files itself, counts screen time through its own state keeper, and serves its metrics on
    the next port (9108 for the main process, then 9109, ... in the order above)."""
    children = []
    for offset, worker in enumerate(_extra_workers(fronts), start=1):
        metrics = fronts.metrics_listen and dataclasses.replace(fronts.metrics_listen,
                                                                 port=fronts.metrics_listen.port + offset)
        pid = os.fork()
        if pid == 0:  # the worker: its front only, until SIGTERM
            code = 1
            try:
                code = uvloop.run(_serve(holder, dataclasses.replace(worker, metrics_listen=metrics), []))
            finally:
                os._exit(code)
        children.append(pid)
    return children


def _extra_workers(fronts: Fronts) -> list[Fronts]:
    """What each process forked beside the main one runs, in the order of their metrics ports."""
    roles: list[Fronts] = []
    if fronts.dns is not None:
        roles += [dataclasses.replace(fronts, proxy_listen=None, proxy_socket=None, role=f"dns-{n}")
                  for n in range(1, fronts.dns.workers)]
    if fronts.proxy_listen is not None:
        roles += [dataclasses.replace(fronts, dns=None, udp_sockets=None, role=f"proxy-{n}")
                  for n in range(1, fronts.proxy_workers)]
    return roles


def _metrics_endpoints(fronts: Fronts) -> tuple[str, ...]:
    """The /metrics of every process of this server: the main one, then each extra worker on the next port."""
    if fronts.metrics_listen is None:
        return ()
    extra = len(_extra_workers(fronts))
    host = fronts.metrics_listen.host
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if host == "0.0.0.0" else "::1"
    host = f"[{host}]" if ":" in host else host
    return tuple(f"http://{host}:{fronts.metrics_listen.port + offset}/metrics" for offset in range(extra + 1))


def _stop_workers(workers: list[int]) -> None:
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in workers:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def run_ca(args: argparse.Namespace) -> int:
    from filter_proxy.ca import ensure_ca

    rules = load_rules(args.rules).rules
    files = ensure_ca(Path(rules.server.data_dir))
    print(f"{'created' if files.created else 'existing'} certificate authority, key in {files.confdir} "
          "(keep it secret: mode 0700)")
    print(f"certificate for the MDM: {files.pem} (PEM), {files.der} (DER)")
    print(f"SHA-256 fingerprint: {files.sha256}")
    return 0


async def _serve(holder: SnapshotHolder, fronts: Fronts, workers: list[int]) -> int:
    loop = asyncio.get_running_loop()
    settings = holder.snapshot.rules.server
    # The store is chosen at start (like listening addresses); each process keeps its own view of it.
    keeper = StateKeeper(lambda: open_store(settings.state), lambda: holder.snapshot.clock.zone,
                         Path(settings.data_dir) / "state-spool")
    await asyncio.to_thread(keeper.start)
    listening: list[str] = []
    dns_servers: list[Closable] = []
    proxy = None
    front = None
    if fronts.dns is not None:
        front = DnsFront(lambda: holder.snapshot, lambda: keeper.view, UpstreamPool(fronts.dns.upstreams),
                         count_minute=keeper.usage.record, rate_limit=fronts.dns.rate_limit,
                         cache=CacheBudget.share(fronts.dns.cache_bytes, fronts.dns.workers))
        dns_servers = await start_dns_servers(front, fronts.dns.listen, fronts.udp_sockets)
        listening.append(f"DNS on {', '.join(map(str, fronts.dns.listen))} (UDP+TCP, {fronts.dns.workers} "
                         f"worker(s)), upstreams {', '.join(map(str, fronts.dns.upstreams))}")
    if fronts.proxy_listen is not None:
        # Imported here: mitmproxy weighs ~60 MB, which a DNS-only worker does not carry.
        from filter_proxy.addon import VigieAddon
        from filter_proxy.ca import ensure_ca
        from filter_proxy.own_addresses import own_addresses
        from filter_proxy.server import start_proxy

        ca = ensure_ca(Path(settings.data_dir))
        addon = VigieAddon(lambda: holder.snapshot, lambda: keeper.view, count_minute=keeper.usage.record,
                           block_page_for_https=settings.https_block_page, own_addresses=own_addresses(settings))
        proxy = await start_proxy(addon, fronts.proxy_socket or fronts.proxy_listen, fronts.proxy_mode, ca.confdir,
                                  fronts.proxy_options)
        listening.append(f"proxy on {fronts.proxy_listen} ({fronts.proxy_mode}, {fronts.proxy_workers} worker(s); "
                         f"CA certificate {ca.pem})")
    api = None
    if fronts.role == MAIN and fronts.api_listen is not None:
        from vigie.api import AdminApi, ensure_token

        api = AdminApi(fronts.api_listen, ensure_token(Path(settings.api.token_file)), lambda: holder.snapshot.rules,
                       lambda: open_store(settings.state))
        api.start()
        listening.append(f"admin API on http://{fronts.api_listen}/v1/ (token in {settings.api.token_file})")
    teacher_page = None
    if fronts.role == MAIN and settings.teacher.listen is not None:
        from vigie.teacher_page import TeacherPage

        teacher_page = TeacherPage(settings.teacher, lambda: holder.snapshot, lambda: open_store(settings.state),
                                   Path(settings.data_dir), _metrics_endpoints(fronts))
        teacher_page.start()
        listening.append(f"teachers' page on https://{settings.teacher.listen}/ (accounts {settings.teacher.accounts})")
    BUILD.info({"version": _version(), "role": fronts.role})
    if fronts.role == MAIN:
        register_screen_time_metrics(lambda: holder.snapshot, lambda: keeper.view)
    metrics = "off"
    if fronts.metrics_listen:
        start_http_server(fronts.metrics_listen.port, addr=fronts.metrics_listen.host)
        metrics = f"http://{fronts.metrics_listen}/metrics"
    stop = asyncio.Event()
    reload_now = asyncio.Event()
    update_now = asyncio.Event()

    def forward_reload() -> None:
        reload_now.set()
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, forward_reload)
    thaw_every = THAW_WITH_PROXY_SECONDS if proxy is not None else THAW_EVERY_SECONDS
    tasks = [asyncio.create_task(_watch(holder, reload_now)),
             asyncio.create_task(_keep_collections_short(thaw_every))]
    started_workers = len(workers)
    if workers:
        tasks.append(asyncio.create_task(_watch_workers(workers, stop)))
    if fronts.role == MAIN:  # one process updates the lists; the workers see the files change
        loop.add_signal_handler(signal.SIGUSR1, update_now.set)
        tasks.append(asyncio.create_task(_refresh_lists(holder, update_now)))
        snapshot = holder.snapshot
        print(f"vigie: {'; '.join(listening)}; metrics {metrics}; state {settings.state}"
              f"{'' if keeper.store_up else ' (UNREACHABLE: deciding without overrides until it answers)'}; "
              f"rules {snapshot.rules.source} "
              f"({len(snapshot.rules.groups)} groups, {len(snapshot.lists.domains)} listed domains); "
              "reload: edit the files or send SIGHUP; update the lists: SIGUSR1", flush=True)
    await stop.wait()
    for task in tasks:
        task.cancel()
    for item in dns_servers:
        item.close()
    if front is not None:
        front.upstreams.close()
    if proxy is not None:
        await proxy.stop()
    if api is not None:
        await asyncio.to_thread(api.stop)
    if teacher_page is not None:
        teacher_page.stop()
    await asyncio.to_thread(keeper.stop)
    if len(workers) < started_workers:
        return 1
    log.info("stopped")
    return 0


async def _keep_collections_short(thaw_every: float) -> None:
    """Caches of hundreds of thousands of answers make a full garbage collection last 100 ms and more: queries
    wait, the socket buffer fills. So every few seconds the young objects are collected and the survivors frozen
    (gc.freeze: never scanned again, still freed when no longer referenced); every `thaw_every` seconds everything
    is thawed and collected, for cycles that formed among frozen objects (mitmproxy's flows make some: a process
    running the proxy thaws every minute, a DNS-only one every hour)."""
    gc.collect()
    gc.freeze()
    since_thaw = 0.0
    while True:
        await asyncio.sleep(FREEZE_EVERY_SECONDS)
        since_thaw += FREEZE_EVERY_SECONDS
        if since_thaw >= thaw_every:
            gc.unfreeze()
            since_thaw = 0.0
        gc.collect()
        gc.freeze()


def _version() -> str:
    try:
        return importlib.metadata.version("vigie")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


async def _watch_workers(workers: list[int], stop: asyncio.Event) -> None:
    """A worker that dies takes the service down with it (exit status 1): the supervisor (systemd) restarts the
    whole, rather than a server silently running on fewer cores."""
    while not stop.is_set():
        await asyncio.sleep(WATCH_INTERVAL_SECONDS)
        for pid in workers:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                log.error("DNS worker %d exited (status %d); stopping the service so that it is restarted whole",
                          pid, status)
                workers.remove(pid)
                stop.set()
                return


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
