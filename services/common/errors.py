"""Errors every service shares: a dependency that cannot be used now.

A late or vanished dependency (the broker, the local store, the store's metrics)
is a reason to wait and retry, never to exit. Their errors derive from
``DependencyUnavailable`` so a supervisor can tell them from bugs.
"""

from __future__ import annotations

import socket

from aio_pika.exceptions import AMQPError
from pamqp.exceptions import PAMQPException


class DependencyUnavailable(Exception):
    """A service this one needs cannot be used now (down, refusing, or too slow)."""


# What a wait on the network raises when the other side is away: ours, the AMQP
# libraries' protocol and connection errors, a refused or reset socket, an unknown
# host, and a deadline passed. (aio-pika's own CONNECTION_EXCEPTIONS also holds
# RuntimeError and OSError, too wide to tell a dependency from a bug.)
DEPENDENCY_ERRORS: tuple[type[BaseException], ...] = (
    DependencyUnavailable,
    TimeoutError,
    ConnectionError,
    socket.gaierror,
    AMQPError,
    PAMQPException,
)
