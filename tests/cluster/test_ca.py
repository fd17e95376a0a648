"""The cluster CA: what it signs verifies, what another CA signs does not, revocation sticks."""

from __future__ import annotations

import datetime
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from awsomefsd.cluster.ca import (
    CertificateError,
    ClusterCA,
    Revocations,
    fingerprint,
    identity_of,
    make_csr,
    new_node_key,
    node_dns_name,
    verify_node_cert,
)


def test_issued_certificate_verifies_and_names_node_and_cluster(ca: ClusterCA) -> None:
    cert = ca.issue(make_csr(new_node_key()), 42)
    identity = verify_node_cert(cert, ca.cert, Revocations())
    assert (identity.cluster_id, identity.node_id, identity.serial) == (ca.cluster_id, 42, cert.serial_number)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert node_dns_name(ca.cluster_id, 42) in names.get_values_for_type(x509.DNSName)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


def test_certificate_of_another_ca_does_not_verify(ca: ClusterCA, other_ca: ClusterCA) -> None:
    cert = other_ca.issue(make_csr(new_node_key()), 1)
    with pytest.raises(CertificateError, match="not issued by this cluster's CA"):
        verify_node_cert(cert, ca.cert)


def test_ca_with_the_same_name_but_another_key_does_not_verify(ca: ClusterCA) -> None:
    impostor = ClusterCA.create(ca.cluster_id)  # same subject, different key
    cert = impostor.issue(make_csr(new_node_key()), 1)
    with pytest.raises(CertificateError):
        verify_node_cert(cert, ca.cert)
    assert impostor.fingerprint != ca.fingerprint


def test_revoked_and_expired_certificates_are_refused(ca: ClusterCA) -> None:
    cert = ca.issue(make_csr(new_node_key()), 3)
    revocations = Revocations()
    revocations.revoke(cert.serial_number)
    with pytest.raises(CertificateError, match="revoked"):
        verify_node_cert(cert, ca.cert, revocations)
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=3650)
    with pytest.raises(CertificateError, match="not valid at this time"):
        verify_node_cert(cert, ca.cert, now=later)


def test_revocations_round_trip_and_replace() -> None:
    revocations = Revocations([5, 7])
    assert Revocations.from_json(revocations.to_json()).snapshot() == {5, 7}
    revocations.replace([9])
    assert revocations.is_revoked(9) and not revocations.is_revoked(5)
    with pytest.raises(ValueError):
        Revocations.from_json(b'["x"]')


def test_csr_with_a_bad_signature_or_key_type_is_refused(ca: ClusterCA) -> None:
    csr = make_csr(new_node_key())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-1] ^= 1  # break the signature
    with pytest.raises(CertificateError, match="signature"):
        ca.issue(x509.load_der_x509_csr(bytes(der)), 1)
    p384 = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
        ec.generate_private_key(ec.SECP384R1()), hashes.SHA256()
    )
    with pytest.raises(CertificateError, match="P-256"):
        ca.issue(p384, 1)
    with pytest.raises(CertificateError, match="out of range"):
        ca.issue(csr, 0)


def test_identity_requires_an_awsomefs_node_name(other_ca: ClusterCA) -> None:
    with pytest.raises(CertificateError):
        identity_of(other_ca.cert)  # the CA names no node


def test_ca_round_trips_through_disk_with_a_private_key_file(tmp_path: Path) -> None:
    ca = ClusterCA.create(uuid.uuid4())
    ca.save(tmp_path)
    loaded = ClusterCA.load(tmp_path)
    assert loaded.cluster_id == ca.cluster_id and loaded.fingerprint == ca.fingerprint == fingerprint(ca.cert)
    assert (tmp_path / "ca.key").stat().st_mode & 0o777 == 0o600
    other = ClusterCA.create(uuid.uuid4())
    (tmp_path / "ca.crt").write_bytes(other.cert_pem)
    with pytest.raises(CertificateError, match="does not belong"):
        ClusterCA.load(tmp_path)
