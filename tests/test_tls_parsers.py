"""The X.509 parsers from recorded PEMs, and `served_certificate` against a local TLS server on loopback."""

from __future__ import annotations

import socket
import ssl
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from crashcart.errors import InvalidInput, TLSError
from integrations import tls

FIXTURES = Path(__file__).parent / "fixtures" / "tls"


def pem(name: str) -> str:
    return (FIXTURES / name).read_text()


# -- PEM parsing (values read with openssl x509, see fixtures/tls/README.md) ----------------------
def test_the_lab_certificate_file_gives_the_leaf_not_the_ca():
    facts = tls.parse_certificate(pem("web-1-lab-chain.pem"))
    assert facts.serial == "24:c2:9d:ac:cf:96:ce:5e:19:02:41:75:eb:4e:a4:fa:22:7c:e6:91"
    assert facts.serial_int == 0x24C29DACCF96CE5E19024175EB4EA4FA227CE691
    assert facts.fingerprint_sha256 == "709c3c81dfa57b878be0418a34903e94a06bddc0f9430d0d8202bff14dd0c4cc"
    assert facts.subject_cn == "web-1.lab.crashcart.test"
    assert facts.issuer_cn == "crashcart lab root CA"
    assert facts.dns_names == ("web-1.lab.crashcart.test",)
    assert facts.ip_addresses == ("10.77.0.11",)
    assert facts.not_before == datetime(2026, 11, 23, 9, 27, 29, tzinfo=timezone.utc)
    assert facts.not_after == datetime(2026, 12, 23, 9, 27, 59, tzinfo=timezone.utc)
    assert len(tls.split_pem(pem("web-1-lab-chain.pem"))) == 2


def test_a_certificate_without_cn_keeps_its_sans():
    facts = tls.parse_certificate(pem("selfsigned-rsa-no-cn.pem"))
    assert facts.subject_cn is None
    assert facts.dns_names == ("a.example.test", "b.example.test")
    assert facts.ip_addresses == ("192.0.2.7",)
    assert facts.fingerprint_sha256 == "bf7db16e723393dff84431a7009c50678615784c194c9136cf99a6c9902e7848"


def test_lifetime_used_and_days_left():
    facts = tls.parse_certificate(pem("web-1-lab-chain.pem"))
    middle = facts.not_before + (facts.not_after - facts.not_before) / 2
    assert facts.lifetime_used(middle) == pytest.approx(0.5)
    assert facts.lifetime_used(facts.not_after + timedelta(days=1)) > 1
    assert facts.days_left(facts.not_after - timedelta(days=3)) == pytest.approx(3)
    assert facts.as_dict()["not_after"] == "2026-12-23T09:27:59+00:00"


@pytest.mark.parametrize("text", ["", "hello", pem("damaged.pem")])
def test_text_that_is_not_a_certificate_is_refused(text):
    with pytest.raises(TLSError):
        tls.parse_certificate(text)


def test_serials_are_spelled_as_vault_spells_them():
    assert tls.format_serial(0x0ABC) == "0a:bc"
    assert tls.format_serial(1) == "01"


# -- a real handshake on loopback -----------------------------------------------------------------
def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(subject: str, issuer_key, issuer_name, key, *, ca: bool, san: list[str] = ()) -> x509.Certificate:
    now = datetime.now(timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(days=10))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in san]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A throwaway CA, a leaf for svc.test signed by it, and another CA that signed nothing."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_key, leaf_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _issue("test CA", ca_key, _name("test CA"), ca_key, ca=True)
    other = _issue("other CA", other_key, _name("other CA"), other_key, ca=True)
    leaf = _issue("svc.test", ca_key, ca.subject, leaf_key, ca=False, san=["svc.test"])
    (d / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (d / "leaf.key").write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()))
    return {"ca": ca.public_bytes(serialization.Encoding.PEM).decode(),
            "other": other.public_bytes(serialization.Encoding.PEM).decode(),
            "leaf": tls.certificate_facts(leaf), "cert_file": d / "leaf.pem", "key_file": d / "leaf.key"}


@pytest.fixture()
def server(pki):
    """A TLS server on 127.0.0.1 presenting the leaf to every client until the test ends."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki["cert_file"], pki["key_file"])
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True) as s:
                    s.recv(1)
            except (ssl.SSLError, OSError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(2)
    listener.close()


def test_the_served_certificate_verified_against_its_ca(pki, server):
    facts = tls.served_certificate("127.0.0.1", server, "svc.test", pki["ca"], timeout=3)
    assert facts == pki["leaf"]


def test_a_certificate_from_another_ca_does_not_verify(pki, server):
    with pytest.raises(TLSError, match="does not verify"):
        tls.served_certificate("127.0.0.1", server, "svc.test", pki["other"], timeout=3)


def test_a_name_the_certificate_does_not_carry_does_not_verify(pki, server):
    with pytest.raises(TLSError, match="does not verify"):
        tls.served_certificate("127.0.0.1", server, "other.test", pki["ca"], timeout=3)


def test_without_a_ca_the_certificate_is_read_unverified(pki, server):
    assert tls.served_certificate("127.0.0.1", server, "other.test", None, timeout=3).serial == pki["leaf"].serial


def test_nothing_listening_is_a_tls_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TLSError, match="unreachable"):
        tls.served_certificate("127.0.0.1", port, "svc.test", None, timeout=1)


def test_a_service_that_never_answers_times_out():
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts in the backlog, never speaks TLS
        with pytest.raises(TLSError, match="within 0.5s"):
            tls.served_certificate("127.0.0.1", silent.getsockname()[1], "svc.test", None, timeout=0.5)


@pytest.mark.parametrize("address,port,name", [("10.0.0.1;rm", 443, "a.test"), ("127.0.0.1", 0, "a.test"),
                                               ("127.0.0.1", 443, "a test"), ("127.0.0.1", 443, "-a.test")])
def test_bad_targets_are_refused_before_connecting(address, port, name):
    with pytest.raises(InvalidInput):
        tls.served_certificate(address, port, name, None, timeout=1)
