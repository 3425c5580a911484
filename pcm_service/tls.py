"""TLS for the service's HTTP API: the server's certificate files, clients' trust, and a small
CA for test deployments (`pcm tls init`).

Clients trust the CA file they are given (``--ca-file`` / ``$PCM_CA_FILE``), else the system
store; a certificate that does not verify is refused, never retried, never ignored.
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from pathlib import Path
from typing import Iterable, Optional

from pcm_service.tokens import open_to_others

CA_FILE_ENV = "PCM_CA_FILE"


class TLSError(ValueError):
    pass


def client_context(ca_file: Optional[str | Path] = None) -> ssl.SSLContext:
    """Verify the service's certificate and host name against ``ca_file`` (else the system store)."""
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as e:
        raise TLSError(f"cannot load the CA file {ca_file}: {e}") from None


def check_server_files(cert: Path, key: Path) -> None:
    """The certificate and key load as a pair; the key is not open to group or others."""
    try:
        mode = key.stat().st_mode
    except OSError as e:
        raise TLSError(f"cannot read the TLS key {key}: {e.strerror}") from None
    problem = open_to_others(key, mode, "TLS key")
    if problem:
        raise TLSError(problem)
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as e:
        raise TLSError(f"cannot use the TLS certificate {cert} with the key {key}: {e}") from None


def is_tls_failure(err: BaseException) -> bool:
    """A refused certificate (or a TLS/plain-HTTP mix-up) rather than a service that is down."""
    seen: Optional[BaseException] = err
    while seen is not None:
        if isinstance(seen, ssl.SSLError) or "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def tls_hint(url: str, ca_file: Optional[str | Path], err: BaseException) -> str:
    trusted = f"the CA file {ca_file}" if ca_file else "the system's CA store"
    return (f"TLS with the PCM service at {url} failed ({err}): its certificate does not verify against"
            f" {trusted}. Pass --ca-file (or set {CA_FILE_ENV}) with the CA that signed the service's"
            " certificate (`pcm tls init DIR` writes DIR/ca.pem), and use https:// for a TLS service")


def default_hosts() -> list[str]:
    names = {"localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn()}
    return sorted(n for n in names if n)


def make_test_ca(out_dir: Path, hosts: Iterable[str], days: int = 365) -> dict[str, Path]:
    """A CA (its key is not kept) and a server certificate + key for ``hosts``, for test deployments.
    Files: ca.pem (what clients trust), server.pem, server.key (0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"PCM test CA ({socket.gethostname()})")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(start).not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pcm-service")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = {"ca": out_dir / "ca.pem", "cert": out_dir / "server.pem", "key": out_dir / "server.key"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].unlink(missing_ok=True)
    fd = os.open(paths["key"], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                   serialization.NoEncryption()))
    return paths
