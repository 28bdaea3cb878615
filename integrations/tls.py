"""TLS certificates: facts parsed from X.509 PEM, and the one TLS handshake that reads what a service serves."""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from dataclasses import dataclass
from datetime import datetime, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from crashcart import validation as v
from crashcart.errors import TLSError

_PEM_RE = re.compile(r"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.DOTALL)


@dataclass(frozen=True)
class CertificateFacts:
    """What matters about a certificate for rotation: identity, validity and names."""

    serial: str               # colon-separated lowercase hex, as Vault spells it
    fingerprint_sha256: str   # lowercase hex of the DER's SHA-256, no separators (as IssuedCertificate)
    not_before: datetime      # UTC
    not_after: datetime       # UTC
    subject_cn: str | None
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    issuer_cn: str | None = None

    @property
    def serial_int(self) -> int:
        """The serial as the integer X.509 and CRLs use."""
        return int(self.serial.replace(":", ""), 16)

    def lifetime_used(self, now: datetime | None = None) -> float:
        """The fraction of the validity period gone at `now` (below 0 before not_before, above 1 once expired)."""
        now = now or datetime.now(timezone.utc)
        total = (self.not_after - self.not_before).total_seconds()
        if total <= 0:
            return 1.0
        return (now - self.not_before).total_seconds() / total

    def days_left(self, now: datetime | None = None) -> float:
        """Days until not_after (negative once expired)."""
        now = now or datetime.now(timezone.utc)
        return (self.not_after - now).total_seconds() / 86400

    def as_dict(self) -> dict:
        """JSON-safe, for evidence and flow results (a certificate holds nothing secret)."""
        return {"serial": self.serial, "fingerprint_sha256": self.fingerprint_sha256,
                "not_before": self.not_before.isoformat(), "not_after": self.not_after.isoformat(),
                "subject_cn": self.subject_cn, "dns_names": list(self.dns_names),
                "ip_addresses": list(self.ip_addresses), "issuer_cn": self.issuer_cn}


def format_serial(number: int) -> str:
    """An integer serial in Vault's spelling: colon-separated lowercase hex byte pairs."""
    digits = format(number, "x")
    if len(digits) % 2:
        digits = "0" + digits
    return ":".join(digits[i:i + 2] for i in range(0, len(digits), 2))


def _common_name(name: x509.Name) -> str | None:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else None


def certificate_facts(cert: x509.Certificate) -> CertificateFacts:
    """Facts of a parsed certificate."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress))
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    return CertificateFacts(
        serial=format_serial(cert.serial_number),
        fingerprint_sha256=cert.fingerprint(hashes.SHA256()).hex(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        subject_cn=_common_name(cert.subject),
        dns_names=dns,
        ip_addresses=ips,
        issuer_cn=_common_name(cert.issuer),
    )


def split_pem(text: str) -> list[str]:
    """Every PEM certificate block in `text`, in order (a certificate file often carries its chain)."""
    return _PEM_RE.findall(text or "")


def parse_certificate(pem: str) -> CertificateFacts:
    """X.509 PEM -> CertificateFacts of its first certificate (the leaf of a cert-plus-chain file)."""
    blocks = split_pem(pem)
    if not blocks:
        raise TLSError("no PEM certificate found (expected -----BEGIN CERTIFICATE-----)")
    try:
        return certificate_facts(x509.load_pem_x509_certificate(blocks[0].encode()))
    except ValueError as e:
        raise TLSError(f"the PEM certificate does not parse: {e}") from None


def parse_der_certificate(der: bytes) -> CertificateFacts:
    """DER (as a TLS handshake delivers it) -> CertificateFacts."""
    try:
        return certificate_facts(x509.load_der_x509_certificate(der))
    except ValueError as e:
        raise TLSError(f"the certificate does not parse: {e}") from None


def served_certificate(address: str, port: int, server_name: str, ca_pem: str | None,
                       timeout: float = 5.0) -> CertificateFacts:
    """The certificate a TLS service presents to us, from a real handshake (SNI = `server_name`).

    With `ca_pem` the chain must verify against that CA and match `server_name`, or TLSError says why;
    with None the certificate is read without verification (to inspect an expired or foreign one).
    """
    address = v.ip_address(address)
    port = v.port(port)
    server_name = v.dns_name(server_name)
    if ca_pem is not None:
        try:
            context = ssl.create_default_context(cadata=ca_pem)
        except ssl.SSLError as e:
            raise TLSError(f"the CA certificate to verify {server_name} against does not load: {e}") from None
    else:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    where = f"{server_name} at {address}:{port}"
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as raw:
            raw.settimeout(timeout)
            raw.connect((address, port))
            with context.wrap_socket(raw, server_hostname=server_name) as tls:
                der = tls.getpeercert(binary_form=True)
    except ssl.SSLCertVerificationError as e:
        raise TLSError(f"{where} served a certificate that does not verify: {e.verify_message}") from None
    except ssl.SSLError as e:
        raise TLSError(f"TLS handshake with {where} failed: {e.reason or e}") from None
    except (socket.timeout, TimeoutError):
        raise TLSError(f"{where} did not complete a TLS handshake within {timeout:g}s") from None
    except OSError as e:
        raise TLSError(f"{where} unreachable: {e.strerror or e}") from None
    if not der:
        raise TLSError(f"{where} presented no certificate")
    return parse_der_certificate(der)
