"""One asyncio dynamic batcher per model: requests wait in its `RequestQueue` (bounded, oldest first, one
`batch_key` per batch), a single runner takes up to `max_batch_size` images at a time, runs the blocking
session call in a worker thread, and splits the results back.

Policy (after Triton's dynamic batcher, not LitServe's loop):
- Whenever the runner is free and images are queued, it takes the queue's next batch.
- It waits to fill a batch only under load, i.e. right after a batch finished: then until the batch
  is full or `max_delay_ms` after the oldest queued image arrived, whichever comes first. A runner
  that was idle starts at once, so a lone request never pays `max_delay_ms`.
- Images whose deadline passed or whose client left are dropped before inference.
- Up to `instances` batches run at once, each in its own worker thread (Triton's instance count): on a
  CPU, two one-thread batches use two cores better than one two-thread batch, whose threads stall at
  every operator when decoding or HTTP takes one of the cores for a moment. A batch that starts while
  nothing else runs goes to `run_alone` instead (the caller's all-cores session), so a lone request
  keeps the lowest latency.
- While every instance is busy, the next batch is staged behind them as soon as it is full, so a worker
  thread goes from one batch to the next without waiting for the event loop (busy with HTTP and decoding,
  it took ~4.5 ms per hand-over on 2 cores). At most one batch is staged.
- The parts of a request larger than a batch may run on several free instances at once, but a part is
  never staged behind a running part of its own request: when a part fails, the request fails at once
  and its parts not yet started never run (parts already running on other instances finish, unread).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Any, Protocol

from service.errors import DeadlineExceeded, InferenceFailed, NotReady, ServiceError
from service.priority import lower_this_thread
from service.request_queue import AUTO, QueuedRequest, RequestQueue, Reservation, Slice

log = logging.getLogger(__name__)


class ClientDisconnected(ServiceError):
    """The client went away while its images were queued; nobody reads this answer."""

    status, type = 499, "client_disconnected"


class BatchObserver(Protocol):
    """Metric callbacks. Every method is optional: a missing one is skipped (see `NullObserver`)."""

    def queue_depth(self, images: int) -> None: ...  # images queued, after every change
    def batch_run(self, size: int, inference_s: float) -> None: ...
    def queue_wait(self, seconds: float) -> None: ...  # per image, from enqueue to batch start
    # "queue_full" | "queue_delay" | "deadline_unreachable" (refused at admission) | "deadline" | "disconnected" | "shutdown"
    def rejected(self, reason: str) -> None: ...


class NullObserver:
    """Observes nothing; subclass it and override only the callbacks you need."""

    def queue_depth(self, images: int) -> None:
        pass

    def batch_run(self, size: int, inference_s: float) -> None:
        pass

    def queue_wait(self, seconds: float) -> None:
        pass

    def rejected(self, reason: str) -> None:
        pass


@dataclasses.dataclass(eq=False)
class _Batch:
    """Slices handed to the worker thread together, and the task that awaits their results."""

    slices: list[Slice]
    alone: bool  # nothing else was running when it was dispatched
    task: asyncio.Task | None = None

    @property
    def size(self) -> int:
        return sum(count for _, _, count in self.slices)

    def items(self) -> list[Any]:
        return [item for request, start, count in self.slices for item in request.items[start:start + count]]


@dataclasses.dataclass
class BatchTiming:
    """Where one request's time in the batcher went: filled by `submit` when the results are in."""

    queued_s: float = 0.0  # waiting for its first batch to start
    inference_s: float = 0.0  # the runtime's time for the batches that held its images


class MicroBatcher:
    def __init__(
        self,
        run_batch: Callable[[list[Any]], list[Any]],
        *,
        max_batch_size: int,
        max_delay_ms: float,
        max_queue_images: int,
        max_queue_delay_ms: float | str | None = None,  # or request_queue.AUTO
        observer: BatchObserver | None = None,
        name: str = "model",
        instances: int = 1,
        run_alone: Callable[[list[Any]], list[Any]] | None = None,
        probe_after_ms: float = 5.0,
    ) -> None:
        if max_batch_size < 1 or max_queue_images < 1 or max_delay_ms < 0 or instances < 1 or (
                max_queue_delay_ms != AUTO and (max_queue_delay_ms or 0) < 0):
            raise ValueError("max_batch_size, max_queue_images and instances must be >= 1, max_delay_ms and "
                             "max_queue_delay_ms >= 0")
        self.name = name
        self.max_delay_s = max_delay_ms / 1000.0
        self._run_batch = run_batch
        self._run_alone = run_alone or run_batch  # for a batch that starts while nothing else runs
        # Only requests that waited this long are asked whether their client left: a probe costs event-loop
        # round trips on the path of a lone request, and a client that left within milliseconds is rare.
        self._probe_after_s = probe_after_ms / 1000.0
        self._observer = observer if observer is not None else NullObserver()
        self.instances = instances
        # One worker thread per instance; a staged batch waits in the executor's queue and starts in order.
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._queue = RequestQueue(name=name, max_images=max_queue_images, max_batch_size=max_batch_size,
                                   instances=instances,
                                   max_delay_s=max_queue_delay_ms if max_queue_delay_ms in (None, AUTO)
                                   else max_queue_delay_ms / 1000)
        # Dispatch order: the first `instances` batches are running, one more may be staged behind them.
        self._in_flight: collections.deque[_Batch] = collections.deque()
        self._wakeup = asyncio.Event()
        self._runner: asyncio.Task | None = None
        self._stopping = False

    # ---- public surface -------------------------------------------------------------------------

    @property
    def max_batch_size(self) -> int:
        return self._queue.max_batch_size

    @property
    def max_queue_images(self) -> int:
        return self._queue.max_images

    @property
    def queued_images(self) -> int:
        """Images waiting: queued, or staged behind the running batches."""
        return self._queue.images + self._staged_images()

    def _running_sizes(self) -> list[int]:
        return [batch.size for batch in list(self._in_flight)[:self.instances]]

    def _staged_images(self) -> int:
        return sum(batch.size for batch in list(self._in_flight)[self.instances:])

    def expect_batch_time(self, size: int, seconds: float) -> None:
        """A batch time measured outside the batcher (at start): a first estimate, refined by the batches that run."""
        self._queue.record_batch(size, seconds)

    @property
    def queue_delay_bound_ms(self) -> float | None:
        """The queue's time bound in force now (see `RequestQueue.delay_bound_s`)."""
        bound = self._queue.delay_bound_s()
        return None if bound is None else round(bound * 1000, 1)

    @property
    def busy(self) -> bool:
        return bool(self._in_flight)

    async def start(self) -> None:
        if self._runner is not None:
            return
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(self.instances, thread_name_prefix=f"batcher-{self.name}",
                                                                   initializer=lower_this_thread)
        self._runner = asyncio.get_running_loop().create_task(self._serve(), name=f"batcher-{self.name}")
        self._runner.add_done_callback(self._runner_ended)

    async def submit(
        self,
        items: list[Any],
        *,
        deadline: float | None = None,
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
        batch_key: Hashable = None,
        admission: Reservation | None = None,
        timing: BatchTiming | None = None,
    ) -> list[Any]:
        """Queue all `items` as one request and return their results in order. With `admission` (from `admit`),
        the request was admitted already; without, it is admitted here. `timing` is filled in on success."""
        items = list(items)
        if self._stopping or self._runner is None:
            self._notify("rejected", "shutdown")
            raise NotReady(f"model '{self.name}' is not accepting requests")
        if not items:
            return []
        if deadline is not None and deadline <= time.monotonic():
            self._notify("rejected", "deadline")
            raise DeadlineExceeded(f"deadline passed before the request reached model '{self.name}'")
        if admission is None:
            self.check_capacity(len(items), deadline)

        loop = asyncio.get_running_loop()
        request = QueuedRequest(items, loop.create_future(), loop.time(), deadline, is_disconnected, batch_key)
        self._queue.add(request, admission)
        self._notify("queue_depth", self.queued_images)
        self._wakeup.set()
        if deadline is not None:
            request.timer = loop.call_later(deadline - time.monotonic(), self._expire, request)
        try:
            results = await request.future
        except asyncio.CancelledError:  # the caller's task was cancelled: its queued images go too
            self._withdraw(request, reason="disconnected")
            raise
        finally:
            if request.timer is not None:
                request.timer.cancel()
        if timing is not None:
            timing.queued_s, timing.inference_s = request.queued_s, request.inference_s
        return results

    def check_capacity(self, images: int, deadline: float | None = None) -> None:
        """Refuse at once (Overloaded, with Retry-After) when `images` more would not fit the queue now, would find
        more than the queue's time bound of work ahead, or would not start before `deadline` (time.monotonic())."""
        refusal = self._queue.refusal(images, staged=self._staged_images(), running=self._running_sizes(),
                                      deadline_in_s=None if deadline is None else deadline - time.monotonic())
        if refusal is not None:
            self._notify("rejected", refusal.reason)
            try:
                raise refusal
            finally:  # the traceback holds this frame: a local naming the exception would make a reference cycle
                del refusal

    def admit(self, images: int, deadline: float | None = None) -> Reservation:
        """Admit a request of `images` before any work is spent on it (decoding), or refuse it (`check_capacity`).
        Its images count as waiting until it is submitted with this reservation, or the reservation is released:
        use it as a context manager around the request's decoding and submit."""
        if self._stopping or self._runner is None:
            self._notify("rejected", "shutdown")
            raise NotReady(f"model '{self.name}' is not accepting requests")
        # Late already (a slow upload), or a deadline shorter than the request takes to start on an idle model (its
        # decoding, and its first parts when it is larger than a batch): no wait would help, so not an overload.
        if deadline is not None and deadline - time.monotonic() <= self._queue.alone_s(images):
            self._notify("rejected", "deadline")
            raise DeadlineExceeded(f"the deadline leaves no time for model '{self.name}' to start the request")
        self.check_capacity(images, deadline)
        return self._queue.reserve(images)

    async def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new work; with `drain`, finish what is queued and running first (up to `timeout`)."""
        self._stopping = True
        if not drain:
            for request in list(self._queue):
                self._fail(request, NotReady(f"model '{self.name}' is shutting down"), reason="shutdown")
        self._wakeup.set()
        if self._runner is not None:
            _, still_running = await asyncio.wait({self._runner}, timeout=timeout)
            if still_running:
                self._runner.cancel()
                await asyncio.wait({self._runner})
            self._fail_everything(NotReady(f"model '{self.name}' shut down"))
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    # ---- the runner -----------------------------------------------------------------------------

    async def _serve(self) -> None:
        under_load = False
        try:
            while True:
                if not self._queue:
                    if self._stopping and not self._in_flight:
                        return
                    under_load = under_load and bool(self._in_flight)
                    await self._wait_for_change()
                    continue
                staging = len(self._in_flight) >= self.instances
                if staging:  # all busy: stage the next batch once it is full and independent of the running ones
                    if len(self._in_flight) > self.instances or not self._queue.next_batch_is_full() or not self._independent():
                        await self._wait_for_change()
                        continue
                elif under_load and not self._stopping:
                    await self._wait_to_fill()
                selection = await self._take_batch(staging)
                if selection:
                    self._dispatch(selection)
                    under_load = True
        except asyncio.CancelledError:  # stop() gave up waiting: the batches' tasks answer their requests
            for batch in list(self._in_flight):
                batch.task.cancel()
            await asyncio.gather(*(batch.task for batch in list(self._in_flight)), return_exceptions=True)
            raise

    async def _wait_for_change(self) -> None:
        """Until a request arrives or leaves, or a batch finishes (all of them set `_wakeup`)."""
        self._wakeup.clear()
        await self._wakeup.wait()

    def _independent(self, selection: list[Slice] | None = None) -> bool:
        """None of the next batch's requests has images in a batch that is still running or staged."""
        return all(request.done == request.taken for request, _, _ in (self._queue.select() if selection is None else selection))

    async def _wait_to_fill(self) -> None:
        """Under load: wait until the next batch is full or its oldest image has waited max_delay."""
        loop = asyncio.get_running_loop()
        while self._queue and not self._stopping:
            if self._queue.next_batch_is_full():
                return
            remaining = self._queue.oldest.enqueued_at + self.max_delay_s - loop.time()
            if remaining <= 0:
                return
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return

    async def _take_batch(self, staging: bool = False) -> list[Slice]:
        """Select the next batch, dropping expired and disconnected requests before they run. When `staging`,
        empty if the selection is no longer independent (the queue's head may change while probes run)."""
        probed: set[QueuedRequest] = set()
        while True:
            for request in self._queue.past_deadline(time.monotonic()):
                self._expire(request)
            selection = self._queue.select()
            waited_enough = asyncio.get_running_loop().time() - self._probe_after_s
            unprobed = [r for r, _, _ in selection
                        if r.is_disconnected is not None and r not in probed and r.enqueued_at <= waited_enough]
            if staging and not self._independent(selection):
                return []
            if not unprobed:
                return self._queue.take(selection)
            gone = await asyncio.gather(*(r.client_left() for r in unprobed))
            for request, is_gone in zip(unprobed, gone, strict=True):
                probed.add(request)
                if is_gone:
                    self._withdraw(request, reason="disconnected")
                    request.fail(ClientDisconnected(f"client left while queued for model '{self.name}'"))

    def _dispatch(self, selection: list[Slice]) -> None:
        """Hand the batch to the worker thread: it starts now, or (staged) when the running batch ends."""
        batch = _Batch(selection, alone=not self._in_flight)
        self._in_flight.append(batch)
        if len(self._in_flight) <= self.instances:
            self._started(batch)
        loop = asyncio.get_running_loop()
        # Handed to the worker thread now rather than from the task's first step: one turn of the loop sooner.
        running = loop.run_in_executor(self._executor, self._call_model, batch.items(), batch.alone)
        batch.task = loop.create_task(self._run(batch, running))
        self._notify("queue_depth", self.queued_images)

    def _started(self, batch: _Batch) -> None:
        now = time.perf_counter()  # not the loop's clock: uvloop's counts whole milliseconds
        for request, _, count in batch.slices:
            if request.started_at is None:
                request.started_at = now
            for _ in range(count):
                self._notify("queue_wait", now - request.queued_at)

    def _finished(self, batch: _Batch) -> None:
        """A worker thread is free: the staged batch, if any, runs now."""
        if batch in self._in_flight:  # not after _fail_everything
            was_running = list(self._in_flight).index(batch) < self.instances
            self._in_flight.remove(batch)
            if was_running and len(self._in_flight) >= self.instances:
                self._started(self._in_flight[self.instances - 1])
            self._notify("queue_depth", self.queued_images)
        self._wakeup.set()

    async def _run(self, batch: _Batch, running: asyncio.Future) -> None:
        size = batch.size
        try:
            outputs, seconds = await running
        except asyncio.CancelledError:  # stop() gave up waiting: nobody will get these results
            for request, _, _ in batch.slices:
                self._fail(request, NotReady(f"model '{self.name}' shut down"), reason="shutdown")
            raise
        except Exception:
            log.exception("model '%s' failed on a batch of %d images", self.name, size)
            error = InferenceFailed(f"model '{self.name}' failed to run a batch of {size} images")
            for request, _, _ in batch.slices:
                self._withdraw(request, reason=None)
                request.fail(error)
        else:
            self._queue.record_batch(size, seconds)
            self._notify("batch_run", size, seconds)
            offset = 0
            for request, start, count in batch.slices:
                request.inference_s += seconds
                request.add_results(start, outputs[offset:offset + count])
                offset += count
        finally:
            self._finished(batch)

    def _call_model(self, items: list[Any], alone: bool) -> tuple[list[Any], float]:
        """Runs in the worker thread: the blocking session call, timed."""
        started = time.perf_counter()
        outputs = list((self._run_alone if alone else self._run_batch)(items))
        seconds = time.perf_counter() - started
        if len(outputs) != len(items):
            raise RuntimeError(f"run_batch returned {len(outputs)} results for {len(items)} items")
        return outputs, seconds

    def _runner_ended(self, runner: asyncio.Task) -> None:
        """A runner that died of a bug must not leave callers waiting forever."""
        if runner.cancelled() or runner.exception() is None:
            return
        log.error("batcher for model '%s' crashed", self.name, exc_info=runner.exception())
        self._stopping = True
        self._fail_everything(InferenceFailed(f"the batcher for model '{self.name}' crashed"))

    def _fail_everything(self, error: ServiceError) -> None:
        running = [request for batch in self._in_flight for request, _, _ in batch.slices]
        for request in running + list(self._queue):
            self._fail(request, error, reason="shutdown")
        self._in_flight.clear()

    # ---- helpers --------------------------------------------------------------------------------

    def _expire(self, request: QueuedRequest) -> None:
        """Deadline reached: drop the images still queued. Images already running are waited for."""
        if request.untaken and not request.future.done():
            self._fail(request, DeadlineExceeded(f"deadline passed while queued for model '{self.name}'"),
                       reason="deadline")

    def _fail(self, request: QueuedRequest, error: ServiceError, *, reason: str) -> None:
        self._withdraw(request, reason=reason)
        request.fail(error)

    def _withdraw(self, request: QueuedRequest, *, reason: str | None) -> None:
        """Remove a request's not-yet-started images from the queue (idempotent)."""
        if not self._queue.withdraw(request):
            return
        self._notify("queue_depth", self.queued_images)
        if reason is not None:
            self._notify("rejected", reason)
        self._wakeup.set()

    def _notify(self, method: str, *args: Any) -> None:
        callback = getattr(self._observer, method, None)
        if callback is None:
            return
        try:
            callback(*args)
        except Exception:  # metrics must never break serving
            log.exception("batch observer %s failed", method)
