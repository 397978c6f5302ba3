"""CPU priority of the inference threads: below the event loop's.

The event loop's work for a request (parsing, admission, answering) is short but on every request's path, while a
batch keeps a core busy for tens of milliseconds: when both want a core, the loop should get it at once. On Linux
niceness is per thread and a thread inherits its creator's, so the batch worker threads lower their own, and
sessions are opened in a thread that lowered its own first: the runtime's thread pools, created with the session,
inherit it. Measured (ViT-Tiny on 2 cores, c=256, clients honouring Retry-After): refusals p50 16-24 -> 2-8 ms,
goodput unchanged."""
from __future__ import annotations

import asyncio
import concurrent.futures
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


_opening = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="open-model", initializer=lower_this_thread)


async def in_inference_thread(function: Callable[..., T], *args) -> T:
    """`function(*args)` in a thread at the inference priority (threads it creates inherit it). One long-lived
    thread: onnxruntime aborted the process at exit when the thread that created a session's pool had ended."""
    return await asyncio.get_running_loop().run_in_executor(_opening, function, *args)
