"""TLS files: checked before use, reloaded when replaced, a bad renewal ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from lethedb_server.api import tls
from lethedb_server.errors import ValidationError
from tests.integration.pki import CertificateAuthority


@pytest.fixture
def ca() -> CertificateAuthority:
    return CertificateAuthority()


def test_tls_is_off_without_files_and_needs_both_cert_and_key():
    assert tls.TlsFiles.from_options("", "", "") is None
    with pytest.raises(ValidationError, match="both tls_cert and tls_key"):
        tls.TlsFiles.from_options("cert.pem", "", "")
    with pytest.raises(ValidationError, match="tls_client_ca alone"):
        tls.TlsFiles.from_options("", "", "ca.pem")


def test_unusable_files_are_refused_with_the_reason(tmp_path: Path, ca: CertificateAuthority):
    cert, key = ca.issue("s", server=True).write(tmp_path, "server")
    _, other_key = ca.issue("t", server=True).write(tmp_path, "other")
    with pytest.raises(ValidationError, match="does not belong to the certificate"):
        tls.load(tls.TlsFiles(cert, other_key))
    with pytest.raises(ValidationError, match=r"tls_cert .* No such file"):
        tls.load(tls.TlsFiles(tmp_path / "absent.pem", key))
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(ValidationError, match="not a PEM certificate chain"):
        tls.load(tls.TlsFiles(tmp_path / "junk.pem", key))
    with pytest.raises(ValidationError, match="not an unencrypted PEM private key"):
        tls.load(tls.TlsFiles(cert, tmp_path / "junk.pem"))
    with pytest.raises(ValidationError, match="tls_client_ca"):
        tls.load(tls.TlsFiles(cert, key, tmp_path / "junk.pem"))


def test_the_fetcher_reloads_replaced_files_and_keeps_the_last_good_pair(
    tmp_path: Path, ca: CertificateAuthority
):
    cert, key = ca.issue("first", server=True).write(tmp_path, "server")
    reloader = tls.CertificateReloader(tls.TlsFiles(cert, key))
    assert "CN=first" in reloader.describe()
    assert reloader.fetch() is None  # nothing changed

    ca.issue("second", server=True).write(tmp_path, "server")
    assert reloader.fetch() is not None
    assert "CN=second" in reloader.describe()
    assert reloader.fetch() is None

    key.write_bytes(ca.issue("stray", server=True).key)  # a key without its certificate
    assert reloader.fetch() is None
    assert "CN=second" in reloader.describe()

    reloader.request_reload()  # SIGHUP: re-read even if unchanged
    ca.issue("third", server=True).write(tmp_path, "server")
    assert reloader.fetch() is not None
    assert "CN=third" in reloader.describe()
    assert reloader.reloads == 2


def test_mtls_requires_client_certificates(tmp_path: Path, ca: CertificateAuthority):
    cert, key = ca.issue("s", server=True).write(tmp_path, "server")
    files = tls.TlsFiles.from_options(str(cert), str(key), str(ca.write(tmp_path / "ca.pem")))
    assert files is not None
    reloader = tls.CertificateReloader(files)
    assert reloader.describe().startswith("mTLS")
    assert reloader.credentials() is not None
