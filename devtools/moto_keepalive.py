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

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from waitress import serve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    # Large photos and many concurrent uploads: raise waitress's small defaults.
    serve(DomainDispatcherApplication(create_backend_app), host=args.host, port=args.port,
          threads=32, connection_limit=512, max_request_body_size=1 << 31, ident="moto")


if __name__ == "__main__":
    main()
