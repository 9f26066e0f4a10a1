"""A throwaway PKI for TLS tests: a CA, a server certificate for 127.0.0.1, client certificates.

Files get the permissions docs/security.md tells a fleet to use: certificates 0644, keys 0600, and
the broker's key readable by group mosquitto (0640, root:mosquitto) when the tests run as root, since
Mosquitto started as root reads it after dropping to user mosquitto."""

from __future__ import annotations

import datetime as dt
import grp
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path, broker: bool = False) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)
    if broker and os.geteuid() == 0:  # the broker drops to its own user before reading its key
        try:
            group = grp.getgrnam("mosquitto").gr_gid
        except KeyError:  # no such user: Mosquitto keeps running as root
            return
        os.chown(path, 0, group)
        path.chmod(0o640)


def make_pki(folder: Path, clients: tuple[str, ...] = ("cam1",)) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge-agent test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": folder / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def leaf(name: str, server: bool) -> None:
        key = _key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
        cert = builder.sign(ca_key, hashes.SHA256())
        out[f"{name}_cert"] = folder / f"{name}.pem"
        out[f"{name}_key"] = folder / f"{name}.key"
        out[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, out[f"{name}_key"], broker=server)

    leaf("server", server=True)
    for client in clients:
        leaf(client, server=False)
    folder.chmod(0o755)  # Mosquitto must reach the files in it
    for p in folder.glob("*.pem"):
        p.chmod(0o644)
    return out
