"""Server TLS and mutual TLS credentials from PEM files.

Files are read once at start; a bad path or a half-configured pair fails the
start with a message instead of a server that silently listens in clear.
"""

from __future__ import annotations

from pathlib import Path

import grpc


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the TLS {what} {path}: {exc.strerror or exc}") from exc


def server_credentials(
    cert: str | None, key: str | None, client_ca: str | None = None
) -> grpc.ServerCredentials | None:
    """None without a certificate (plaintext); with ``client_ca``, clients must present a
    certificate signed by it (mutual TLS)."""
    if not cert and not key:
        if client_ca:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not cert or not key:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    pair = (_read(key, "key"), _read(cert, "certificate"))
    roots = _read(client_ca, "client CA") if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=roots,
                                       require_client_auth=roots is not None)
