"""The queue of one model's requests, bounded and counted in images; the batcher (`service.batching`)
decides when to take from it.

- Admission is decided before any work is spent: a request that does not fit is refused whole, at once,
  with a Retry-After estimated from how long recent batches took.
- The next batch is up to `max_batch_size` images sharing the oldest request's `batch_key`, oldest request
  first, so no key starves; a request's images stay in order and may be split across batches.
- A request leaves the queue when its images are taken, or when it is withdrawn (deadline passed, client
  left, shutdown) with the images not yet taken.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import math
from collections.abc import Awaitable, Callable, Hashable, Iterator
from typing import Any

from service.errors import Overloaded

_RECENT_BATCH_WEIGHT = 0.2  # of the latest batch in the running average of batch times
_DISCONNECT_PROBE_TIMEOUT_S = 0.1  # a well-behaved probe answers at once; a stuck one must not stall batching


@dataclasses.dataclass(eq=False)
class QueuedRequest:
    """One submit() call: its images, how far the runner got, and the future its caller awaits."""

    items: list[Any]
    future: asyncio.Future
    enqueued_at: float  # loop time
    deadline: float | None  # time.monotonic() value
    is_disconnected: Callable[[], Awaitable[bool]] | None
    batch_key: Hashable
    results: list[Any] = dataclasses.field(init=False)  # filled slice by slice, in item order
    taken: int = 0  # images handed to the runner so far
    done: int = 0  # images with results
    timer: asyncio.TimerHandle | None = None

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)

    @property
    def untaken(self) -> int:
        return len(self.items) - self.taken

    def add_results(self, start: int, outputs: list[Any]) -> None:
        """Results for the images from `start` on; the caller gets all of them once every image has one."""
        self.results[start:start + len(outputs)] = outputs
        self.done += len(outputs)
        if self.done == len(self.items) and not self.future.done():
            self.future.set_result(self.results)

    def fail(self, error: Exception) -> None:
        """Answer the caller with `error`, unless it was answered already."""
        if not self.future.done():
            self.future.set_exception(error)

    async def client_left(self) -> bool:
        """Asks `is_disconnected` (which must be set); a failing or slow probe says nothing: keep the request."""
        try:
            return bool(await asyncio.wait_for(self.is_disconnected(), _DISCONNECT_PROBE_TIMEOUT_S))
        except Exception:
            return False


# A slice of one request inside a batch: (request, first image index, number of images).
Slice = tuple[QueuedRequest, int, int]


class RequestQueue:
    """Requests in arrival order. Only images not yet taken count; a batch staged outside the queue is
    counted by its owner and passed to `refusal` as `staged`."""

    def __init__(self, *, name: str, max_images: int, max_batch_size: int, instances: int) -> None:
        self.name = name  # of the model, for messages
        self.max_images = max_images
        self.max_batch_size = max_batch_size
        self._instances = instances  # batches that run side by side: the queue drains that much faster
        self._requests: collections.deque[QueuedRequest] = collections.deque()
        self._images = 0  # untaken images across _requests
        self._batch_s_average: float | None = None  # for the Retry-After estimate

    # ---- what is queued -------------------------------------------------------------------------

    @property
    def images(self) -> int:
        return self._images

    def __bool__(self) -> bool:
        return bool(self._requests)

    def __iter__(self) -> Iterator[QueuedRequest]:
        return iter(self._requests)

    @property
    def oldest(self) -> QueuedRequest:
        return self._requests[0]

    def past_deadline(self, now: float) -> list[QueuedRequest]:
        """Requests whose deadline (a time.monotonic() value) is `now` or earlier."""
        return [request for request in self._requests if request.deadline is not None and request.deadline <= now]

    # ---- admission ------------------------------------------------------------------------------

    def refusal(self, images: int, *, staged: int = 0) -> Overloaded | None:
        """Why `images` more cannot be admitted now (with Retry-After), or None when they fit.
        `staged` images were taken but wait behind the running batches: they still count."""
        waiting = self._images + staged
        if waiting + images <= self.max_images:
            return None
        if images > self.max_images:
            return Overloaded(f"a request of {images} images exceeds model '{self.name}' queue of "
                              f"{self.max_images} images")
        batches_ahead = waiting / self.max_batch_size + 1
        retry_after = math.ceil(batches_ahead * (self._batch_s_average or 0.0) / self._instances)
        return Overloaded(f"model '{self.name}' queue is full ({waiting} images waiting)",
                          retry_after_s=min(max(retry_after, 1), 60))

    def record_batch_seconds(self, seconds: float) -> None:
        """How long a batch took to run: the Retry-After estimate follows a running average."""
        if self._batch_s_average is None:
            self._batch_s_average = seconds
        else:
            self._batch_s_average = (1 - _RECENT_BATCH_WEIGHT) * self._batch_s_average + _RECENT_BATCH_WEIGHT * seconds

    # ---- in and out -----------------------------------------------------------------------------

    def add(self, request: QueuedRequest) -> None:
        """Queue an admitted request (see `refusal`) behind the others."""
        self._requests.append(request)
        self._images += request.untaken

    def withdraw(self, request: QueuedRequest) -> bool:
        """Remove a request's images not yet taken (idempotent); False when it had none left."""
        if request.untaken == 0:
            return False
        self._images -= request.untaken
        request.taken = len(request.items)
        self._requests.remove(request)
        return True

    # ---- the next batch -------------------------------------------------------------------------

    def next_batch_is_full(self) -> bool:
        """The oldest request's key has at least `max_batch_size` images queued."""
        return bool(self._requests) and self._images_for(self._requests[0].batch_key) >= self.max_batch_size

    def select(self) -> list[Slice]:
        """Up to max_batch_size images sharing the oldest request's key, FIFO. Mutates nothing."""
        if not self._requests:
            return []
        key = self._requests[0].batch_key
        selection: list[Slice] = []
        room = self.max_batch_size
        for request in self._requests:
            if request.batch_key != key:
                continue
            count = min(room, request.untaken)
            selection.append((request, request.taken, count))
            room -= count
            if room == 0:
                break
        return selection

    def take(self, selection: list[Slice]) -> list[Slice]:
        """Hand the selected images to the runner; a request with none left leaves the queue."""
        for request, _, count in selection:
            request.taken += count
            self._images -= count
            if request.untaken == 0:
                self._requests.remove(request)
        return selection

    def _images_for(self, key: Hashable) -> int:
        """Images queued under `key`, counted only up to max_batch_size."""
        total = 0
        for request in self._requests:
            if request.batch_key == key:
                total += request.untaken
                if total >= self.max_batch_size:
                    break
        return total
