"""TLS and mutual TLS for the gRPC server, with certificates reloaded without a restart.

The server's credentials are gRPC's *dynamic* SSL credentials: before each
new TLS handshake gRPC asks :meth:`CertificateReloader.fetch` whether the
certificate configuration changed. ``fetch`` compares the files' identity
(inode, size, modification and change times) with what it loaded last, so
replacing the certificate, key or client CA files (for example by
cert-manager or certbot) takes effect for the next connection; connections
already open keep their session. SIGHUP forces a re-read on the next
handshake.

A new set of files is only used once it is complete and consistent: the
certificate chain and the client CA must parse, and the private key must
belong to the first certificate. Files caught half-written, or a key that
does not match, are reported once and the previous configuration stays in
force, so a botched renewal never takes the server off the air.

With ``tls_client_ca`` the server requires every client to present a
certificate signed by that CA (mTLS). Client certificates authenticate the
connection; roles still come from bearer tokens.

Never log or copy the private key; log paths, subjects and expiry dates only.
"""

from __future__ import annotations

import logging
import stat
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from lethedb_server.errors import ValidationError

log = logging.getLogger(__name__)

_Signature = tuple[tuple[int, int, int, int] | None, ...]


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def from_options(cls, cert: str, key: str, client_ca: str) -> TlsFiles | None:
        """The configured files, None when TLS is off; refuses half a configuration."""
        if not (cert or key or client_ca):
            return None
        if not (cert and key):
            raise ValidationError(
                "TLS needs both tls_cert and tls_key"
                + (" (tls_client_ca alone does not enable TLS)" if client_ca else "")
            )
        return cls(Path(cert), Path(key), Path(client_ca) if client_ca else None)

    def paths(self) -> tuple[Path, ...]:
        return (
            (self.cert, self.key)
            if self.client_ca is None
            else (
                self.cert,
                self.key,
                self.client_ca,
            )
        )


@dataclass(frozen=True)
class _Loaded:
    chain: bytes
    key: bytes
    client_ca: bytes | None
    subject: str
    not_after: str

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key, self.chain)], root_certificates=self.client_ca
        )


def _identity(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def load(files: TlsFiles) -> _Loaded:
    """Read and check the files; ValidationError says which one is unusable and why."""

    def read(path: Path, what: str) -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ValidationError(f"{what} {path}: {exc}") from exc

    chain = read(files.cert, "tls_cert")
    key = read(files.key, "tls_key")
    try:
        certs = x509.load_pem_x509_certificates(chain)
    except ValueError as exc:
        raise ValidationError(
            f"tls_cert {files.cert} is not a PEM certificate chain: {exc}"
        ) from None
    try:
        private_key = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as exc:
        # The exception text never contains key material, only what failed.
        raise ValidationError(
            f"tls_key {files.key} is not an unencrypted PEM private key: {exc}"
        ) from None
    public = (
        certs[0]
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    if public != private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise ValidationError(
            f"tls_key {files.key} does not belong to the certificate in tls_cert {files.cert}"
        )
    client_ca = None
    if files.client_ca is not None:
        client_ca = read(files.client_ca, "tls_client_ca")
        try:
            x509.load_pem_x509_certificates(client_ca)
        except ValueError as exc:
            raise ValidationError(
                f"tls_client_ca {files.client_ca} is not a PEM certificate bundle: {exc}"
            ) from None
    return _Loaded(
        chain,
        key,
        client_ca,
        certs[0].subject.rfc4514_string(),
        certs[0].not_valid_after_utc.isoformat(),
    )


class CertificateReloader:
    """Hands gRPC the current certificate configuration; see the module docstring."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._signature = self._current_signature()
        self._loaded = load(files)
        self._force = False
        self._rejected: _Signature | None = None
        self.reloads = 0
        _warn_if_key_readable_by_others(files.key)

    def _current_signature(self) -> _Signature:
        return tuple(_identity(p) for p in self.files.paths())

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._loaded.configuration(),
            self.fetch,  # type: ignore[arg-type]  # None means no change; stubs omit it
            require_client_authentication=self.files.client_ca is not None,
        )

    def describe(self) -> str:
        mode = "mTLS (client certificates required)" if self.files.client_ca else "TLS"
        return (
            f"{mode} with certificate {self._loaded.subject}, valid until {self._loaded.not_after}"
        )

    def request_reload(self) -> None:
        """Re-read the files before the next handshake even if they look unchanged (SIGHUP)."""
        self._force = True

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate configuration fetcher: a new configuration, or None for no change.

        Called by gRPC before each handshake, on one of its threads: it must be
        quick when nothing changed (three ``stat`` calls) and must never raise.
        """
        try:
            signature = self._current_signature()
            if signature == self._signature and not self._force:
                return None
            if signature == self._rejected and not self._force:
                return None
            self._force = False
            try:
                loaded = load(self.files)
            except ValidationError as exc:
                self._rejected = signature
                log.error("TLS files changed but are not usable; keeping the old ones: %s", exc)
                return None
            self._signature, self._loaded, self._rejected = signature, loaded, None
            self.reloads += 1
            log.info("TLS certificate reloaded: %s", self.describe())
            return loaded.configuration()
        except Exception:  # gRPC would only print it; keep serving with what we have
            log.exception("TLS certificate reload failed; keeping the old certificate")
            return None


def _warn_if_key_readable_by_others(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "TLS private key %s is accessible to group or others (mode %o); chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )
