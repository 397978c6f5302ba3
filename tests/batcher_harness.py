"""A started MicroBatcher around a fake model, for the batcher's tests (test_batching, test_request_queue):
the model records its batches and can hold or fail one; the observer records every callback."""
from __future__ import annotations

import asyncio
import threading
import time

from service.batching import MicroBatcher, NullObserver


class FakeModel:
    """A blocking run_batch: records every batch, sleeps `delay` seconds, can fail or hold a batch."""

    def __init__(self, delay: float = 0.0, fail_on: str | None = None) -> None:
        self.delay = delay
        self.fail_on = fail_on
        self.batches: list[list] = []
        self.started_at: list[float] = []  # perf_counter() at the start of each batch
        self.started = threading.Event()  # set when a batch holding "hold" starts
        self.release = threading.Event()  # that batch finishes once this is set

    def __call__(self, items: list) -> list:
        self.started_at.append(time.perf_counter())
        self.batches.append(list(items))
        if "hold" in items:
            self.started.set()
            self.release.wait(timeout=5)
        time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError("boom: secret traceback detail")
        return [f"out:{item}" for item in items]

    @property
    def sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]

    @property
    def seen(self) -> list:
        return [item for batch in self.batches for item in batch]


class RecordingObserver(NullObserver):
    def __init__(self) -> None:
        self.depths: list[int] = []
        self.runs: list[tuple[int, float]] = []
        self.waits: list[float] = []
        self.rejections: list[str] = []

    def queue_depth(self, images: int) -> None:
        self.depths.append(images)

    def batch_run(self, size: int, inference_s: float) -> None:
        self.runs.append((size, inference_s))

    def queue_wait(self, seconds: float) -> None:
        self.waits.append(seconds)

    def rejected(self, reason: str) -> None:
        self.rejections.append(reason)


def run(test_body, model: FakeModel, loop_factory=None, **options):
    """Build a started batcher, hand it to `test_body`, and always release and stop it (on `loop_factory`'s event
    loop: asyncio's by default; the service runs on uvloop's)."""
    options = {"max_batch_size": 4, "max_delay_ms": 20, "max_queue_images": 64, **options}

    async def main():
        batcher = MicroBatcher(model, name="vit-test", **options)
        await batcher.start()
        try:
            return await test_body(batcher)
        finally:
            model.release.set()
            await batcher.stop(drain=False, timeout=5)

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


async def hold_runner(batcher: MicroBatcher, model: FakeModel) -> asyncio.Task:
    """Occupy the runner with a batch that finishes only when `model.release` is set."""
    task = asyncio.create_task(batcher.submit(["hold"]))
    while not model.started.is_set():
        await asyncio.sleep(0.001)
    return task


async def until_queued(batcher: MicroBatcher, images: int) -> None:
    while batcher.queued_images < images:
        await asyncio.sleep(0.001)
