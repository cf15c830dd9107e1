"""Vigie's certificate authority: created on the proxy's first start, exported for the MDM.

The key stays in `<data_dir>/proxy-ca/` (mode 0700, key files 0600: whoever reads it can impersonate any site to
every tablet). The certificate alone is exported to `<data_dir>/ca/vigie-ca.pem` and `.der`, which the MDM installs
as a trusted root on the tablets (iPadOS wants DER or PEM, Android PEM as `.crt`).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy.certs import CertStore

# mitmproxy reads `<confdir>/mitmproxy-ca.pem` (key and certificate): the name is its convention, not ours.
MITMPROXY_BASENAME = "mitmproxy"
KEY_BITS = 2048


@dataclass(frozen=True)
class CaFiles:
    confdir: Path
    pem: Path
    der: Path
    sha256: str  # of the DER certificate, as MDM consoles and `openssl x509 -fingerprint -sha256` show it
    created: bool


def ensure_ca(data_dir: Path, organization: str = "Vigie") -> CaFiles:
    """Create the CA if there is none; (re)export its certificate. Returns where everything is."""
    confdir = data_dir / "proxy-ca"
    confdir.mkdir(parents=True, exist_ok=True)
    os.chmod(confdir, 0o700)
    created = not (confdir / f"{MITMPROXY_BASENAME}-ca.pem").exists()
    if created:
        CertStore.create_store(confdir, MITMPROXY_BASENAME, KEY_BITS, organization=organization,
                               cn=f"{organization} filtering CA")
    certificate = x509.load_pem_x509_certificate((confdir / f"{MITMPROXY_BASENAME}-ca-cert.pem").read_bytes())
    export = data_dir / "ca"
    export.mkdir(parents=True, exist_ok=True)
    der = certificate.public_bytes(serialization.Encoding.DER)
    (export / "vigie-ca.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (export / "vigie-ca.der").write_bytes(der)
    fingerprint = hashlib.sha256(der).hexdigest().upper()
    return CaFiles(confdir, export / "vigie-ca.pem", export / "vigie-ca.der",
                   ":".join(fingerprint[i:i + 2] for i in range(0, len(fingerprint), 2)), created)
