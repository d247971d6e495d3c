"""moto's S3-protocol server with HTTP/1.1 keep-alive, as MinIO and S3 have.

``moto_server`` runs on werkzeug's development server, which closes the
connection after every response, so each client request pays for a new TCP
connection: a cost a real site does not have, and one that distorts the
benchmarks. Here moto's WSGI application is served by waitress instead.

    python -m devtools.moto_keepalive --host 127.0.0.1 --port 9000
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from typing import Any

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from waitress import serve


def serve_s3(host: str, port: int, wrap: Callable[[Any], Any] | None = None) -> None:
    """Serve moto's S3 on ``host:port`` (``wrap`` may put another WSGI layer in front)."""
    app = DomainDispatcherApplication(create_backend_app)
    # Large photos and many concurrent uploads: raise waitress's small defaults.
    serve(app if wrap is None else wrap(app), host=host, port=port,
          threads=32, connection_limit=512, max_request_body_size=1 << 31, ident="moto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    serve_s3(args.host, args.port)


if __name__ == "__main__":
    main()
