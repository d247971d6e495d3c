"""HTTPS for devices: the gateway's certificate and key, loaded at start and again when renewed.

Tokens are bearer credentials, so on a site network anyone who reads one can
upload as its device: with ``PHOTOFERRY_GATEWAY_TLS_CERT`` and
``PHOTOFERRY_GATEWAY_TLS_KEY`` set the gateway serves HTTPS only. A renewed
certificate (a Kubernetes Secret updated in place) is loaded by the next check,
without a restart; one that cannot be loaded is logged and the current one kept.
"""

from __future__ import annotations

import logging
import os
import ssl

from services.common.config import ConfigError, TlsFiles

log = logging.getLogger(__name__)

RELOAD_CHECK_S = 10.0


def server_context(files: TlsFiles) -> ssl.SSLContext:
    """A server context for ``files``; raise ConfigError naming the settings when they cannot be loaded."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(files.cert, files.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"PHOTOFERRY_GATEWAY_TLS_CERT, PHOTOFERRY_GATEWAY_TLS_KEY: cannot load {files.cert} "
                          f"with {files.key}: {exc}") from None
    return context


class CertificateReloader:
    """Load the certificate into the serving context again when its files change."""

    def __init__(self, context: ssl.SSLContext, files: TlsFiles) -> None:
        self.context = context
        self.files = files
        self._seen = self._stamp()

    def _stamp(self) -> tuple[float, ...]:
        # os.stat follows the symlinks a Kubernetes Secret volume swaps on an update.
        return tuple(os.stat(path).st_mtime for path in (self.files.cert, self.files.key))

    async def check(self) -> None:
        try:
            stamp = self._stamp()
        except OSError as exc:
            log.error("cannot read the TLS certificate files; serving the one loaded before",
                      extra={"error": str(exc)})
            return
        if stamp == self._seen:
            return
        try:
            self.context.load_cert_chain(self.files.cert, self.files.key)
        except (OSError, ssl.SSLError) as exc:
            # A certificate and key written one after the other may disagree for a moment: next check.
            log.error("the renewed TLS certificate cannot be loaded; serving the one loaded before",
                      extra={"error": str(exc), "cert": self.files.cert})
            return
        self._seen = stamp
        log.info("TLS certificate loaded again", extra={"cert": self.files.cert})
