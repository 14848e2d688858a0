"""A local certificate authority for the served stack, minted with `cryptography`.

`LocalCA(folder)` keeps, in a private folder (`.serve/tls/`, mode 0700, every key 0600):

    ca.crt / ca.key          the authority (what every S3 client is given: AWS_CA_BUNDLE, DVC's ssl_verify)
    server.crt / server.key  the S3 gateway's certificate, for 127.0.0.1 and localhost (IP and DNS names in the
                             subjectAltName) plus any further `hosts` (the address remote organisations dial)
    internal.crt / .key      the SeaweedFS components' certificate for their mutual-TLS gRPC (server and
                             client authentication, the same authority)

`ensure()` reuses them (a restart keeps the authority remote organisations trust): it mints everything when the
authority is missing, and only the two leaf certificates, signed by the same authority, when one is missing or
the server's names differ from `hosts`; `mint()` replaces them all (rotation).
"""

import datetime as dt
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from flows.private import private_dir, write_private

DAYS = 825  # the longest validity a TLS client accepts for a server certificate


@dataclass
class LocalCA:
    folder: Path
    hosts: list[str] = field(default_factory=lambda: ["127.0.0.1", "localhost"])

    @property
    def ca_cert(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.folder / "ca.key"

    @property
    def server_cert(self) -> Path:
        return self.folder / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    @property
    def internal_cert(self) -> Path:
        return self.folder / "internal.crt"

    @property
    def internal_key(self) -> Path:
        return self.folder / "internal.key"

    def files(self) -> list[Path]:
        return [self.ca_cert, self.ca_key, self.server_cert, self.server_key, self.internal_cert, self.internal_key]

    def ensure(self) -> "LocalCA":
        """Reuse the authority and certificates; mint what is missing or names other hosts."""
        if not (self.ca_cert.exists() and self.ca_key.exists()):
            return self.mint()
        leaves = [self.server_cert, self.server_key, self.internal_cert, self.internal_key]
        if not all(p.exists() for p in leaves) or self.names() != set(self.hosts):
            ca_key = serialization.load_pem_private_key(self.ca_key.read_bytes(), password=None)
            self._leaves(x509.load_pem_x509_certificate(self.ca_cert.read_bytes()), ca_key)
        return self

    def names(self) -> set[str]:
        """The hosts the server certificate is valid for."""
        cert = x509.load_pem_x509_certificate(self.server_cert.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return {str(n.value) for n in san}

    def mint(self) -> "LocalCA":
        """A new authority, server and internal certificate (every earlier one stops being trusted)."""
        private_dir(self.folder)
        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)  # tolerate a little clock skew
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedse"),
                             x509.NameAttribute(NameOID.COMMON_NAME, "fedse local CA")])
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
              .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + dt.timedelta(days=DAYS))
              .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                           content_commitment=False, key_encipherment=False,
                                           data_encipherment=False, key_agreement=False, encipher_only=False,
                                           decipher_only=False), critical=True)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
              .sign(ca_key, hashes.SHA256()))
        write_private(self.ca_key, _pem_key(ca_key))
        write_private(self.ca_cert, ca.public_bytes(serialization.Encoding.PEM))
        return self._leaves(ca, ca_key)

    def _leaves(self, ca: x509.Certificate, ca_key) -> "LocalCA":
        """The server and internal certificates, signed by the authority."""
        private_dir(self.folder)
        now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        for cert, key, name, usages in (
                (self.server_cert, self.server_key, "fedse S3 gateway", [ExtendedKeyUsageOID.SERVER_AUTH]),
                (self.internal_cert, self.internal_key, "fedse seaweedfs internal",
                 [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])):
            leaf_key = ec.generate_private_key(ec.SECP256R1())
            leaf = (x509.CertificateBuilder()
                    .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedse"),
                                             x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                    .issuer_name(ca.subject).public_key(leaf_key.public_key())
                    .serial_number(x509.random_serial_number())
                    .not_valid_before(now).not_valid_after(now + dt.timedelta(days=DAYS))
                    .add_extension(x509.SubjectAlternativeName(_names(self.hosts)), critical=False)
                    .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                    .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                                 content_commitment=False, data_encipherment=False,
                                                 key_agreement=False, key_cert_sign=False, crl_sign=False,
                                                 encipher_only=False, decipher_only=False), critical=True)
                    .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                    .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
                    .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                   critical=False)
                    .sign(ca_key, hashes.SHA256()))
            write_private(key, _pem_key(leaf_key))
            write_private(cert, leaf.public_bytes(serialization.Encoding.PEM))
        return self

    def fingerprint(self) -> str:
        """SHA-256 of the authority's certificate (to compare out of band with what an organisation was given)."""
        cert = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        return cert.fingerprint(hashes.SHA256()).hex()


def _names(hosts: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
