"""TLS for the relay: a self-signed certificate kept on disk, its pin, and SSL contexts.

One certificate, SAN = the DERP host name (an IP SAN when it is an IP literal), no metacert:
the portable choice for clients pinning it with CertName "sha256-raw:<hex>" (docs/protocol.md, "DERP").
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

CERT_VALIDITY_DAYS = 365 * 3
RENEW_BEFORE_DAYS = 30


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _safe_name(host: str) -> str:
    return host.replace(":", "_").replace("/", "_")


def cert_paths(certdir: str | os.PathLike[str], hostname: str) -> tuple[Path, Path]:
    """derper's manual-mode layout: <certdir>/<hostname>.crt and .key."""
    d = Path(certdir)
    return d / f"{_safe_name(hostname)}.crt", d / f"{_safe_name(hostname)}.key"


def generate_self_signed(hostname: str) -> tuple[bytes, bytes]:
    """(cert PEM, key PEM) for a new ECDSA P-256 self-signed certificate for ``hostname``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    san: x509.GeneralName
    if _is_ip(hostname):
        san = x509.IPAddress(ipaddress.ip_address(hostname))
    else:
        san = x509.DNSName(hostname)
    now = _dt.datetime.now(_dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(hours=1))
        .not_valid_after(now + _dt.timedelta(days=CERT_VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert_pem, key_pem


def _usable(cert_file: Path, hostname: str) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    except (OSError, ValueError):
        return False
    now = _dt.datetime.now(_dt.UTC)
    if cert.not_valid_after_utc - now < _dt.timedelta(days=RENEW_BEFORE_DAYS):
        return False
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    if _is_ip(hostname):
        return ipaddress.ip_address(hostname) in sans.get_values_for_type(x509.IPAddress)
    return hostname in sans.get_values_for_type(x509.DNSName)


def ensure_self_signed(certdir: str | os.PathLike[str], hostname: str) -> tuple[Path, Path]:
    """Reuse <certdir>/<hostname>.crt/.key when valid for ``hostname``, else create them."""
    cert_file, key_file = cert_paths(certdir, hostname)
    if cert_file.exists() and key_file.exists() and _usable(cert_file, hostname):
        return cert_file, key_file
    cert_file.parent.mkdir(parents=True, exist_ok=True)
    cert_pem, key_pem = generate_self_signed(hostname)
    tmp_key = key_file.with_suffix(".key.tmp")
    fd = os.open(tmp_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    os.replace(tmp_key, key_file)
    tmp_cert = cert_file.with_suffix(".crt.tmp")
    tmp_cert.write_bytes(cert_pem)
    os.replace(tmp_cert, cert_file)
    return cert_file, key_file


def cert_name(cert: str | os.PathLike[str] | bytes) -> str:
    """DERP-map CertName pin: "sha256-raw:<lowercase hex sha256 of the certificate DER>".

    ``cert`` is a PEM file path, PEM bytes or DER bytes (the first certificate counts).
    """
    if isinstance(cert, bytes):
        data = cert
    else:
        data = Path(cert).read_bytes()
    if b"-----BEGIN" in data:
        der = x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
    else:
        der = data
    return "sha256-raw:" + hashlib.sha256(der).hexdigest()


def server_ssl_context(cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str],
                       *, hostname: str | None = None) -> ssl.SSLContext:
    """Server context for a cert/key pair: TLS >= 1.2, ALPN http/1.1 only (never h2).

    With ``hostname`` set to a DNS name, an SNI naming something else is refused, as derper
    does in manual cert mode.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
    ctx.set_alpn_protocols(["http/1.1"])
    if hostname and not _is_ip(hostname):
        want = hostname.lower()

        def _sni(sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> int | None:
            if name is not None and name.lower() != want:
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            return None

        ctx.sni_callback = _sni
    return ctx


def client_ssl_context(cert_file: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """Client context trusting ``cert_file`` (a self-signed server cert); none = no checks."""
    if cert_file is None:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cafile=os.fspath(cert_file))
