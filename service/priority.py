"""CPU priority of the inference threads: below the event loop's.

The event loop's work for a request (parsing, admission, answering) is short but on every request's path, while a
batch keeps a core busy for tens of milliseconds: when both want a core, the loop should get it at once. On Linux
niceness is per thread and a thread inherits its creator's, so the batch worker threads lower their own, and
sessions are opened in a thread that lowered its own first: the runtime's thread pools, created with the session,
inherit it. Measured (ViT-Tiny on 2 cores, c=256, clients honouring Retry-After): refusals p50 16-24 -> 2-8 ms,
goodput unchanged."""
from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")
INFERENCE_NICENESS = 10


def lower_this_thread() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), INFERENCE_NICENESS)
    except (AttributeError, OSError):  # not Linux, or not allowed: run at the process's priority
        pass


async def in_inference_thread(function: Callable[..., T], *args) -> T:
    """`function(*args)` in a new thread at the inference priority (threads it creates inherit it)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(result=None, error: BaseException | None = None) -> None:
        if done.done():  # the caller was cancelled
            return
        if error is not None:
            done.set_exception(error)
        else:
            done.set_result(result)

    def target() -> None:
        lower_this_thread()
        try:
            result = function(*args)
        except BaseException as error:  # noqa: BLE001 - handed to the awaiting caller
            loop.call_soon_threadsafe(settle, None, error)
        else:
            loop.call_soon_threadsafe(settle, result)

    threading.Thread(target=target, name="open-model", daemon=True).start()
    return await done
