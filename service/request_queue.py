"""The queue of one model's requests, bounded in images and in time; the batcher (`service.batching`)
decides when to take from it.

- Admission is decided before any work is spent: a request is refused whole, at once, with a Retry-After,
  when its images do not fit the image bound, when the work queued ahead of it is more than the time bound,
  or when it would not start before its deadline. Time is estimated from the images ahead of the request
  and how long recent batches took (running averages), so a request that is admitted starts in time unless
  the batches suddenly get slower. Images of admitted requests still being decoded count as ahead
  (`Reservation`), so a burst is judged as a whole rather than each request against an empty queue.
- The next batch is up to `max_batch_size` images sharing the oldest request's `batch_key`, oldest request
  first, so no key starves; a request's images stay in order and may be split across batches.
- A request leaves the queue when its images are taken, or when it is withdrawn (deadline passed, client
  left, shutdown) with the images not yet taken.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import math
import random
import time
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from typing import Any

from service.errors import Overloaded

AUTO = "auto"  # a time bound that follows the model's speed (`RequestQueue.delay_bound_s`)
# The automatic time bound: the time the instances take to run this many images each, and never under a second. A
# fixed time refuses a slow model at normal load (ViT-Base on 2 cores runs about 10 images/s, one at a time: at c=16,
# 1 s of queued work was exceeded and 16% of requests were refused) while a fast one queues hundreds of batches.
AUTO_BOUND_IMAGES_PER_INSTANCE = 16
AUTO_BOUND_FLOOR_S = 1.0
_RECENT_BATCH_WEIGHT = 0.2  # of the latest batch in the running averages of batch times
_MAX_RETRY_AFTER_S = 60
# Clients that honour Retry-After (whole seconds) and were refused together come back together, and a herd is
# answered one request after another: each refusal adds 0 to this many seconds to the estimate, at random, so the
# herd comes back spread out. ViT-Tiny, 256 such clients on 2 cores: refusal p99 42-78 ms with the same Retry-After
# for all, 10-18 ms with the spread (README, "Under overload").
RETRY_AFTER_SPREAD_S = 1
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
    # perf_counter() values, for its queue wait (uvloop's loop time counts whole milliseconds)
    queued_at: float = dataclasses.field(default_factory=time.perf_counter)
    started_at: float | None = None  # when its first batch started
    inference_s: float = 0.0  # the run times of the batches that held its images, added up

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)

    @property
    def queued_s(self) -> float:
        """From the queue to its first batch's start."""
        return 0.0 if self.started_at is None else self.started_at - self.queued_at

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


class Reservation:
    """Images admitted but not queued yet (their request is being decoded): they count as waiting until the
    request is queued or given up. A context manager: leaving it releases what is still reserved."""

    def __init__(self, queue: RequestQueue, images: int) -> None:
        self._queue, self.images = queue, images
        self.admitted_at = time.monotonic()
        queue._reserved += images

    def release(self) -> None:
        self._queue._reserved -= self.images
        self.images = 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class RequestQueue:
    """Requests in arrival order. Only images not yet taken count; a batch staged outside the queue is
    counted by its owner and passed to `refusal` as `staged`, and the batches running as `running`."""

    def __init__(self, *, name: str, max_images: int, max_batch_size: int, instances: int,
                 max_delay_s: float | str | None = None,
                 retry_spread: Callable[[], int] = functools.partial(random.randint, 0, RETRY_AFTER_SPREAD_S)) -> None:
        self.name = name  # of the model, for messages
        self._retry_spread = retry_spread  # seconds added to a refusal's Retry-After
        self.max_images = max_images
        # the most work, in seconds, a request may find ahead of it; AUTO: follows the batch time; None: no bound
        self.max_delay_s = max_delay_s
        self.max_batch_size = max_batch_size
        self._instances = instances  # batches that run side by side: the queue drains that much faster
        self._requests: collections.deque[QueuedRequest] = collections.deque()
        self._images = 0  # untaken images across _requests
        self._reserved = 0  # images of admitted requests not queued yet (Reservation)
        self._batch_s: dict[int, float] = {}  # batch size -> running average of its time
        self._to_queue_s = 0.0  # running average from admission to the queue (decoding): part of the wait

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

    def reserve(self, images: int) -> Reservation:
        """Count `images` as waiting from now until they are queued (`add`) or the reservation is released."""
        return Reservation(self, images)

    def alone_s(self, images: int) -> float:
        """Seconds until the last of `images` would start with nothing ahead of it: decoding (a running average of
        how long admitted requests take to reach the queue) and, for a request larger than a batch, its first parts."""
        return self._to_queue_s + (self.drain_s(max(0, images - self.max_batch_size)) if self._batch_s else 0.0)

    def batch_s(self, size: int) -> float | None:
        """How long a batch of `size` images takes (running average); a size not timed yet is scaled from the
        nearest size that was; None before any batch was timed."""
        if size in self._batch_s:
            return self._batch_s[size]
        if not self._batch_s:
            return None
        nearest = min(self._batch_s, key=lambda timed: (abs(timed - size), -timed))
        return self._batch_s[nearest] * size / nearest

    def drain_s(self, images: int) -> float:
        """Seconds for the instances to run `images` waiting images, in full batches and one partial."""
        full, rest = divmod(images, self.max_batch_size)
        return (full * self.batch_s(self.max_batch_size) + (self.batch_s(rest) if rest else 0.0)) / self._instances

    def wait_s(self, images: int, *, staged: int = 0, running: Sequence[int] = ()) -> tuple[float, float] | None:
        """Estimated seconds of work ahead of a request of `images` arriving now, and until its last image starts
        (it is decoded first, and a request larger than a batch runs in parts); None before any batch was timed.
        The work ahead: the `running` batches (their sizes; half done on average) and every waiting image, shared
        by the instances."""
        if not self._batch_s:
            return None
        waiting = self._images + staged + self._reserved
        if waiting == 0 and len(running) < self._instances:
            first = 0.0  # an instance is free
        else:
            first = sum(self.batch_s(size) for size in running) / 2 / self._instances + self.drain_s(waiting)
        return first, first + self.alone_s(images)

    def delay_bound_s(self) -> float | None:
        """The time bound in force: the configured one, or with AUTO the time to run `AUTO_BOUND_IMAGES_PER_INSTANCE`
        images per instance (at least `AUTO_BOUND_FLOOR_S`; None until a batch was timed)."""
        if self.max_delay_s != AUTO:
            return self.max_delay_s
        if not self._batch_s:
            return None
        return max(AUTO_BOUND_FLOOR_S, self.drain_s(AUTO_BOUND_IMAGES_PER_INSTANCE * self._instances))

    def refusal(self, images: int, *, staged: int = 0, running: Sequence[int] = (),
                deadline_in_s: float | None = None) -> Overloaded | None:
        """Why `images` more cannot be admitted now (with Retry-After), or None when they may be.
        `staged` images were taken but wait behind the `running` batches: they still count. `deadline_in_s`:
        how long until the request's deadline. The time bound never refuses while the waiting images would not
        give each instance one full batch: the instances must never run dry for lack of admitted work (when the
        batches slow down, because something else takes the cores, the estimate grows, and a time bound alone
        would then starve the model exactly when it can least afford to)."""
        if images > self.max_images:
            return Overloaded(f"a request of {images} images exceeds model '{self.name}' queue of "
                              f"{self.max_images} images")
        waiting = self._images + staged + self._reserved
        wait = self.wait_s(images, staged=staged, running=running)
        if waiting + images > self.max_images:
            return Overloaded(f"model '{self.name}' queue is full ({waiting} images waiting)",
                              retry_after_s=self._retry_after_s(wait))
        if wait is None:
            return None
        first, last = wait
        keeps_instances_busy = waiting + images <= self._instances * self.max_batch_size
        bound = self.delay_bound_s()
        if bound is not None and first > bound and not keeps_instances_busy:
            return Overloaded(f"model '{self.name}' has about {first * 1000:.0f} ms of work queued (the limit is "
                              f"{bound * 1000:.0f} ms)", retry_after_s=self._retry_after_s(wait), reason="queue_delay")
        # Refused for the work ahead of it, so worth retrying later; a deadline too short even for an idle model is
        # not an overload (the caller answers it with 504, see MicroBatcher.admit).
        if deadline_in_s is not None and last > deadline_in_s >= self.alone_s(images):
            return Overloaded(f"model '{self.name}' would start this request in about {last * 1000:.0f} ms, after its "
                              f"deadline ({max(deadline_in_s, 0) * 1000:.0f} ms away)",
                              retry_after_s=self._retry_after_s(wait), reason="deadline_unreachable")
        return None

    def _retry_after_s(self, wait: tuple[float, float] | None) -> int:
        """A refusal's Retry-After: the work ahead in whole seconds (at least 1), plus the spread."""
        return min(max(math.ceil(wait[0]) if wait else 1, 1) + self._retry_spread(), _MAX_RETRY_AFTER_S)

    def record_batch(self, images: int, seconds: float) -> None:
        """How long a batch of `images` took to run: the time estimates follow running averages, one per size
        (a batch's time is far from proportional to its size)."""
        average = self._batch_s.get(images)
        self._batch_s[images] = seconds if average is None else average + _RECENT_BATCH_WEIGHT * (seconds - average)

    # ---- in and out -----------------------------------------------------------------------------

    def add(self, request: QueuedRequest, reservation: Reservation | None = None) -> None:
        """Queue an admitted request (see `refusal`) behind the others; its images stop being reserved."""
        if reservation is not None:
            if reservation.images:  # how long decoding took under the current load
                self._to_queue_s += _RECENT_BATCH_WEIGHT * (time.monotonic() - reservation.admitted_at - self._to_queue_s)
            reservation.release()
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
