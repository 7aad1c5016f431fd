"""URIs that may carry credentials (`https://user:password@host`): masked in what is shown
(`redact`), left out of what is stored (`public_uri`)."""

from __future__ import annotations

from urllib.parse import urlparse


def redact(uri: str) -> str:
    """The URI with its password masked, for messages and logs."""
    parsed = urlparse(uri)
    if parsed.password:
        return uri.replace(f":{parsed.password}@", ":***@", 1)
    return uri


def public_uri(uri: str) -> str:
    """The URI without user and password: what is stored (state, params, config.yaml).
    Credentials travel in MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""
    parsed = urlparse(uri)
    if parsed.username is None and parsed.password is None:
        return uri
    host = parsed.hostname or ""
    netloc = f"{host}:{parsed.port}" if parsed.port else host
    return parsed._replace(netloc=netloc).geturl()
