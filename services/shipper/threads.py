"""Blocking calls (boto3's uploads) in worker threads, with the caller's trace context."""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Threads:
    def __init__(self, workers: int) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="transfer")

    async def run(self, function: Callable[..., T], *args: Any) -> T:
        # The copy of the context carries the trace into the worker thread.
        context = contextvars.copy_context()
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(context.run, function, *args)
        )

    def close(self) -> None:
        """Let running calls end by themselves (they stop at their next read once aborted)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
