"""WireGuard keys and configuration texts for tablets that go home. Keys come from `wg` (Debian's
wireguard-tools) when it is installed, else from the `cryptography` package mitmproxy already brings: both give
the same Curve25519 keys in the same base64 form."""

from __future__ import annotations

import base64
import shutil
import subprocess
from dataclasses import dataclass

from policy.model import IPAddress, VpnSettings


@dataclass(frozen=True)
class KeyPair:
    private: str
    public: str


def generate_keypair() -> KeyPair:
    wg = shutil.which("wg")
    if wg is None:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
        from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

        private = base64.b64encode(X25519PrivateKey.generate().private_bytes(
            Encoding.Raw, PrivateFormat.Raw, NoEncryption())).decode()
        return KeyPair(private, public_key_of(private))
    private = subprocess.run([wg, "genkey"], capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    public = subprocess.run([wg, "pubkey"], input=private + "\n", capture_output=True, text=True, check=True,
                            timeout=10).stdout.strip()
    return KeyPair(private, public)


def public_key_of(private: str) -> str:
    # Imported here: every `vigie` process loads this module with the CLI, and a DNS worker has no use for the
    # ~12 MB of a crypto library.
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = X25519PrivateKey.from_private_bytes(base64.b64decode(private))
    return base64.b64encode(key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()


def client_config(vpn: VpnSettings, name: str, address: IPAddress, private_key: str) -> str:
    """The tablet's configuration: Vigie is its DNS server; either only Vigie's address or all traffic goes through
    the tunnel (`vpn.route`)."""
    routed = "0.0.0.0/0, ::/0" if vpn.route == "all" else f"{vpn.server_address}/{vpn.server_address.max_prefixlen}"
    return (f"# Vigie: {name}\n"
            "[Interface]\n"
            f"PrivateKey = {private_key}\n"
            f"Address = {address}/{address.max_prefixlen}\n"
            f"DNS = {vpn.server_address}\n"
            "\n"
            "[Peer]\n"
            f"PublicKey = {vpn.server_public_key}\n"
            f"Endpoint = {vpn.endpoint}\n"
            f"AllowedIPs = {routed}\n"
            f"PersistentKeepalive = {vpn.keepalive}\n")


def server_peer(name: str, group: str, address: str, public_key: str, enrolled_at: str) -> str:
    return (f"# {name} ({group}), enrolled {enrolled_at}\n"
            "[Peer]\n"
            f"PublicKey = {public_key}\n"
            f"AllowedIPs = {address}/{32 if ':' not in address else 128}\n")
