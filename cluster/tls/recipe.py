"""Mutual-TLS security for diffdask clusters (``distributed.Security``)."""

from __future__ import annotations

from distributed import Client, LocalCluster
from distributed.security import Security


def security(ca_file: str, cert_file: str, key_file: str) -> Security:
    """The same mutual-TLS settings for client, scheduler and workers; TLS is required."""
    return Security(
        tls_ca_file=ca_file,
        tls_client_cert=cert_file,
        tls_client_key=key_file,
        tls_scheduler_cert=cert_file,
        tls_scheduler_key=key_file,
        tls_worker_cert=cert_file,
        tls_worker_key=key_file,
        require_encryption=True,
    )


def local_tls_client(sec: Security, n_workers: int = 2) -> Client:
    """A LocalCluster speaking TLS on 127.0.0.1 (to try the certificates)."""
    cluster = LocalCluster(n_workers=n_workers, protocol="tls://", host="127.0.0.1", security=sec,
                           dashboard_address="127.0.0.1:0")
    return Client(cluster, security=sec)
