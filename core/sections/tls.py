"""TLS settings of a service that serves HTTP (router, console, coordinator status): a certificate and its key."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from fedllm.core.sections.base import Section


class ServesTLS(Section):
    """A section whose service answers over HTTPS when given a certificate and its private key (PEM files)."""

    tls_cert: Path | None = Field(None, description="PEM certificate (chain) to serve HTTPS with; None = plain HTTP.")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert (keep it mode 0600).")

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> "ServesTLS":
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both (HTTPS) or neither (HTTP)")
        return self

    @property
    def scheme(self) -> str:
        """`https` with a certificate, else `http`."""
        return "https" if self.tls_cert is not None else "http"
