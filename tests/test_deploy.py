"""What a city installs from deploy/, checked with the tools that will read it: systemd-analyze for the units, nft
for the firewall rules, promtool for the compose Prometheus, Vigie's own loader for the compose rules mounted as the
container sees them. Docker itself cannot run here, so the compose file and the Dockerfile are checked statically:
every path they name exists, every package the project ships is copied, the services are wired to each other."""

from __future__ import annotations

import configparser
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import yaml

from policy.state_store import StoreAddress, StoreUnavailable, open_store
from tests.conftest import REPO, free_port

DEPLOY = REPO / "deploy"
DOCKER = DEPLOY / "docker"


def tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: `make system-deps` installs Debian's {package}")
    return path


# -- systemd ----------------------------------------------------------------------------------------------------

def unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit as shipped, with ExecStart pointing at this checkout's `vigie` (systemd-analyze checks it exists)."""
    text = (DEPLOY / "systemd" / "vigie@.service").read_text()
    assert "ExecStart=/opt/vigie/.venv/bin/vigie %i " in text
    unit = tmp_path / "vigie@.service"
    unit.write_text(text.replace("/opt/vigie/.venv/bin/vigie", str(Path(sys.executable).parent / "vigie")))
    return unit


@pytest.mark.parametrize("instance", ["run", "dns", "proxy"])
def test_the_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path, instance: str) -> None:
    unit = unit_for_this_machine(tmp_path)
    result = subprocess.run([tool("systemd-analyze", "systemd"), "verify", str(unit.with_name(f"vigie@{instance}"
                                                                                                  ".service"))],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    # Unknown or misspelt directives are only warnings for systemd: any output is a failure here.
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), result.stderr


def test_the_systemd_unit_is_hardened(tmp_path: Path) -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "systemd" / "vigie@.service")
    service = unit["Service"]
    assert service["User"] == "vigie" and service["Group"] == "vigie"
    assert service["CapabilityBoundingSet"] == service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert service["ProtectSystem"] == "strict" and service["StateDirectory"] == "vigie"
    assert service["Restart"] == "on-failure"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID", "systemctl reload = Vigie's rules reload"
    sysusers = (DEPLOY / "systemd" / "vigie.sysusers").read_text()
    assert re.search(r"^u vigie - .* /var/lib/vigie /usr/sbin/nologin$", sysusers, re.MULTILINE)
    assert "--api-listen off" in (DEPLOY / "systemd" / "proxy.env").read_text()

    result = subprocess.run([tool("systemd-analyze", "systemd"), "security", "--offline=yes",
                             str(unit_for_this_machine(tmp_path).with_name("vigie@run.service"))],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    exposure = re.search(r"Overall exposure level for vigie@run.service: ([\d.]+)", result.stdout)
    assert exposure, result.stdout + result.stderr
    assert float(exposure.group(1)) <= 2.0, result.stdout  # systemd's "OK" band; 9.6 for an unhardened service


# -- nftables ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["school-gateway.nft", "vigie-server.nft"])
def test_the_firewall_rules_pass_nft_check(name: str) -> None:
    result = subprocess.run([tool("nft", "nftables"), "-c", "-f", str(DEPLOY / "nftables" / name)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_firewall_rules_say_what_the_issue_asks() -> None:
    gateway = (DEPLOY / "nftables" / "school-gateway.nft").read_text()
    assert re.search(r"th dport 53 dnat ip to \$VIGIE", gateway), "DNS forced to Vigie"
    assert "tcp dport 853 reject" in gateway and "udp dport { 443, 853 } reject" in gateway, "DoT, DoQ, QUIC"
    server = (DEPLOY / "nftables" / "vigie-server.nft").read_text()
    assert "policy drop" in server
    assert re.search(r"ip saddr @clients tcp dport 8080 accept", server), "the proxy for schools and the VPN only"


# -- WireGuard --------------------------------------------------------------------------------------------------

def test_the_wireguard_server_reads_the_peers_vigie_writes() -> None:
    from vigie.devices import WireguardDirectory

    template = (DEPLOY / "wireguard" / "wg0.conf").read_text()
    peers = WireguardDirectory("/var/lib/vigie").server_peers
    assert f"PostUp = wg addconf %i {peers}" in template
    assert "PostUp = wg set %i private-key /etc/wireguard/server.key" in template
    assert "/var/lib/vigie" in (DEPLOY / "systemd" / "vigie@.service").read_text()


# -- Docker -----------------------------------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    return loaded


def mounts(service: dict[str, Any]) -> list[tuple[Path | str, str]]:
    """(host path or volume name, container path) of a service's volumes."""
    found: list[tuple[Path | str, str]] = []
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        found.append(((DOCKER / source).resolve() if source.startswith(".") else source, target))
    return found


def test_the_compose_file_wires_vigie_redis_prometheus_and_grafana() -> None:
    services = compose()["services"]
    assert set(services) == {"vigie", "redis", "prometheus", "grafana"}
    declared = set(compose()["volumes"])
    for name, service in services.items():
        for source, target in mounts(service):
            if isinstance(source, Path):
                assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
        for port in service.get("ports", []):
            assert re.fullmatch(r"\d+:\d+/(tcp|udp)", port), f"{name}: {port}"
    vigie = services["vigie"]
    assert "redis" in vigie["depends_on"]
    assert (DOCKER / vigie["build"]["context"] / vigie["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    assert any(target == "/etc/grafana/provisioning" for _, target in mounts(services["grafana"]))


def test_the_compose_redis_needs_the_password_the_rules_read(tmp_path: Path) -> None:
    """The compose Redis is started by its own command line, on loopback here, with the secret in a file: a client
    without the password is refused, Vigie's store with the rules' password file gets in."""
    services = compose()["services"]
    redis_service, vigie = services["redis"], services["vigie"]
    assert "ports" not in redis_service, "Redis is never published"
    assert "redis_password" in redis_service["secrets"] and "redis_password" in vigie["secrets"]
    rules_text = (DOCKER / "rules.yaml").read_text()
    assert "state_password_file: /run/secrets/redis_password" in rules_text
    secret = tmp_path / "redis-password"
    secret.write_text("city-secret-123\n")
    port = free_port()
    command = redis_service["command"][2].replace("$$", "$").replace("/run/secrets/redis_password", str(secret))
    command += f" --port {port} --bind 127.0.0.1 --dir {tmp_path} --appendonly no --save ''"
    process = subprocess.Popen(["sh", "-c", command], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        address = StoreAddress.parse(f"redis://127.0.0.1:{port}/0", tmp_path)
        deadline = time.monotonic() + 10
        while True:
            try:
                open_store(dataclasses.replace(address, password_file=str(secret))).usage(date(2026, 12, 1))
                break
            except StoreUnavailable:
                assert time.monotonic() < deadline, "the compose Redis did not start"
                time.sleep(0.1)
        with pytest.raises(StoreUnavailable, match=r"authenticated|NOAUTH"):
            open_store(address).usage(date(2026, 12, 1))
    finally:
        process.kill()
        process.wait(timeout=10)


def test_the_dockerfile_copies_what_exists_and_every_package() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    context = (DOCKER / compose()["services"]["vigie"]["build"]["context"]).resolve()
    copied = []
    for sources in re.findall(r"^COPY (.+) \S+$", dockerfile, re.MULTILINE):
        for source in sources.split():
            assert (context / source).exists(), f"COPY {source}: not in the build context {context}"
            copied.append(source.rstrip("/"))
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert {p.split(".")[0] for p in packages} <= set(copied), "every package the project ships is in the image"
    assert re.search(r"^FROM python:3\.11", dockerfile, re.MULTILINE)
    assert re.search(r"^USER vigie$", dockerfile, re.MULTILINE), "not root at run time"
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv/" in ignored and "var/" in ignored, "no virtualenv or data in the build context"


def test_the_compose_rules_load_as_the_container_sees_them(tmp_path: Path) -> None:
    """Build the container's /etc/vigie from the compose mounts, and check the rules there."""
    etc = tmp_path / "etc-vigie"
    for source, target in mounts(compose()["services"]["vigie"]):
        if isinstance(source, Path) and target.startswith("/etc/vigie"):
            destination = etc / Path(target).relative_to("/etc/vigie")
            destination.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if source.is_dir() else shutil.copy)(source, destination)
    rules = etc / "rules.yaml"
    text = rules.read_text()
    assert "state: redis://redis:6379/0" in text and "data_dir: /var/lib/vigie" in text
    rules.write_text(text.replace("data_dir: /var/lib/vigie", f"data_dir: {tmp_path / 'data'}"))
    result = subprocess.run([sys.executable, "-m", "vigie", "check", str(rules)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert re.search(r"listen: \[0\.0\.0\.0:53\]", text) and "listen: 0.0.0.0:8080" in text


def test_the_compose_prometheus_scrapes_vigie_and_loads_the_alerts(tmp_path: Path) -> None:
    services = compose()["services"]
    layout = {target: source for source, target in mounts(services["prometheus"]) if isinstance(source, Path)}
    config = yaml.safe_load(layout["/etc/prometheus/prometheus.yml"].read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    targets = config["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["vigie:9108"], "the vigie service's metrics port"
    # promtool with the container's paths made local.
    (tmp_path / "alerts.yml").write_text(layout["/etc/prometheus/alerts.yml"].read_text())
    config["rule_files"] = [str(tmp_path / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))
    result = subprocess.run([tool("promtool", "prometheus"), "check", "config", str(tmp_path / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    grafana = {target: source for source, target in mounts(compose()["services"]["grafana"])
               if isinstance(source, Path)}
    provisioning = grafana["/etc/grafana/provisioning"]
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((provisioning / "dashboards" / "vigie.yml").read_text())["providers"][0]
    dashboard = grafana[f"{provider['options']['path']}/vigie.json"]
    assert dashboard == DEPLOY / "grafana" / "vigie.json"
