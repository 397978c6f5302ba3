"""The dynamic batcher: batches form under load, never delay a lone request, stay bounded and fair,
drop dead work before inference, isolate failures and drain on stop. Plain asyncio.run, no plugin."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from service.batching import ClientDisconnected, MicroBatcher, NullObserver
from service.errors import DeadlineExceeded, InferenceFailed, NotReady, Overloaded


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


def run(test_body, model: FakeModel, **options):
    """Build a started batcher, hand it to `test_body`, and always release and stop it."""
    options = {"max_batch_size": 4, "max_delay_ms": 20, "max_queue_images": 64, **options}

    async def main():
        batcher = MicroBatcher(model, name="vit-test", **options)
        await batcher.start()
        try:
            return await test_body(batcher)
        finally:
            model.release.set()
            await batcher.stop(drain=False, timeout=5)

    return asyncio.run(main())


async def hold_runner(batcher: MicroBatcher, model: FakeModel) -> asyncio.Task:
    """Occupy the runner with a batch that finishes only when `model.release` is set."""
    task = asyncio.create_task(batcher.submit(["hold"]))
    while not model.started.is_set():
        await asyncio.sleep(0.001)
    return task


async def until_queued(batcher: MicroBatcher, images: int) -> None:
    while batcher.queued_images < images:
        await asyncio.sleep(0.001)


def test_concurrent_requests_form_batches():
    model = FakeModel(delay=0.05)

    async def body(batcher):
        return await asyncio.gather(*(batcher.submit([i]) for i in range(16)))

    results = run(body, model, max_batch_size=8)
    assert results == [[f"out:{i}"] for i in range(16)]
    assert max(model.sizes) > 1
    assert max(model.sizes) <= 8
    assert sorted(model.seen) == list(range(16))


def test_lone_request_is_not_delayed():
    model = FakeModel()

    async def body(batcher):
        latencies = []
        for i in range(3):  # also after a finished batch, once the runner has gone idle again
            started = time.perf_counter()
            assert await batcher.submit([i]) == [f"out:{i}"]
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(0.05)
        return latencies

    latencies = run(body, model, max_delay_ms=500)
    assert max(latencies) < 0.1


def test_under_load_waits_up_to_max_delay_to_fill_a_batch():
    model = FakeModel()

    async def body(batcher):
        holder = await hold_runner(batcher, model)
        single = asyncio.create_task(batcher.submit(["late"]))
        await until_queued(batcher, 1)
        queued_at = time.perf_counter()
        model.release.set()
        await holder
        await single
        return time.perf_counter() - queued_at

    waited = run(body, model, max_batch_size=4, max_delay_ms=150)
    assert 0.12 < waited < 0.5
    assert model.sizes == [1, 1]


def test_under_load_a_full_batch_does_not_wait():
    model = FakeModel()

    async def body(batcher):
        holder = await hold_runner(batcher, model)
        full = asyncio.create_task(batcher.submit(["a", "b", "c", "d"]))
        await until_queued(batcher, 4)
        released_at = time.perf_counter()
        model.release.set()
        await holder
        await full
        return time.perf_counter() - released_at

    waited = run(body, model, max_batch_size=4, max_delay_ms=500)
    assert waited < 0.1
    assert model.sizes == [1, 4]


def test_a_full_batch_is_staged_and_starts_without_the_event_loop():
    """The worker thread goes straight from the running batch to the staged one, even while the loop is blocked."""
    model = FakeModel()

    async def body(batcher):
        holder = await hold_runner(batcher, model)
        full = asyncio.create_task(batcher.submit(["a", "b", "c", "d"]))
        while batcher.busy and len(batcher._in_flight) < 2:
            await asyncio.sleep(0.001)
        assert batcher.queued_images == 4  # staged images still count as waiting (queue bound, Retry-After)
        model.release.set()
        time.sleep(0.2)  # the event loop is busy elsewhere
        unblocked_at = time.perf_counter()
        await holder
        assert await full == ["out:a", "out:b", "out:c", "out:d"]
        return unblocked_at

    unblocked_at = run(body, model, max_batch_size=4, max_delay_ms=0)
    assert model.batches == [["hold"], ["a", "b", "c", "d"]]
    assert model.started_at[1] < unblocked_at


def test_only_one_batch_is_staged_and_a_partial_batch_is_not():
    model = FakeModel()

    async def body(batcher):
        holder = await hold_runner(batcher, model)
        tasks = [asyncio.create_task(batcher.submit([i])) for i in range(10)]
        await until_queued(batcher, 10)
        await asyncio.sleep(0.05)
        staged = [batch.size for batch in list(batcher._in_flight)[1:]]
        model.release.set()
        await holder
        return staged, await asyncio.gather(*tasks)

    staged, results = run(body, model, max_batch_size=4, max_delay_ms=0)
    assert staged == [4]  # 4 staged, 6 still queued: neither a second full batch nor the partial one
    assert results == [[f"out:{i}"] for i in range(10)]
    assert model.batches == [["hold"], [0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_instances_run_batches_at_once_and_stage_one_more():
    model = FakeModel()

    async def body(batcher):
        first = await hold_runner(batcher, model)
        second = asyncio.create_task(batcher.submit(["hold"]))  # not full, yet it starts on the free instance
        while len(model.batches) < 2:
            await asyncio.sleep(0.001)
        more = [asyncio.create_task(batcher.submit([i])) for i in range(4)]
        await asyncio.sleep(0.05)
        in_flight, waiting = [batch.size for batch in batcher._in_flight], batcher.queued_images
        model.release.set()
        return in_flight, waiting, await asyncio.gather(first, second, *more)

    in_flight, waiting, results = run(body, model, max_batch_size=2, max_delay_ms=0, instances=2)
    assert in_flight == [1, 1, 2]  # two running at once, one full batch staged, the rest queued
    assert waiting == 4
    assert results == [["out:hold"], ["out:hold"]] + [[f"out:{i}"] for i in range(4)]
    assert model.batches == [["hold"], ["hold"], [0, 1], [2, 3]]


def test_parts_of_a_large_request_run_on_several_instances_at_once():
    model = FakeModel()

    async def body(batcher):
        split = asyncio.create_task(batcher.submit(["hold", "p1", "p2", "p3"]))
        while len(model.batches) < 2:  # [p2, p3] starts while [hold, p1] is held
            await asyncio.sleep(0.001)
        model.release.set()
        return await split

    assert run(body, model, max_batch_size=2, max_delay_ms=0, instances=2) == ["out:hold", "out:p1", "out:p2", "out:p3"]
    assert model.batches == [["hold", "p1"], ["p2", "p3"]]


def test_a_failing_part_stops_the_parts_of_its_request_that_have_not_started():
    model = FakeModel(fail_on="bad")

    async def body(batcher):
        with pytest.raises(InferenceFailed):
            await batcher.submit(["bad", "p1", "p2", "p3", "p4", "p5", "p6", "p7"])
        await asyncio.sleep(0.05)

    run(body, model, max_batch_size=2, max_delay_ms=0, instances=2)
    # two parts start at once on the two instances; none is staged behind its own request's parts
    assert sorted(map(tuple, model.batches)) == [("bad", "p1"), ("p2", "p3")]


def test_request_larger_than_max_batch_is_split_and_answered_whole_in_order():
    model = FakeModel()

    async def body(batcher):
        return await batcher.submit(list(range(10)))

    assert run(body, model, max_batch_size=4) == [f"out:{i}" for i in range(10)]
    assert model.sizes == [4, 4, 2]
    assert model.seen == list(range(10))


def test_requests_are_served_first_in_first_out():
    model = FakeModel()

    async def body(batcher):
        holder = await hold_runner(batcher, model)
        tasks = [asyncio.create_task(batcher.submit(items)) for items in (["a1", "a2", "a3"], ["b1", "b2"], ["c1"])]
        await until_queued(batcher, 6)
        model.release.set()
        await holder
        return await asyncio.gather(*tasks)

    results = run(body, model, max_batch_size=4)
    assert results == [["out:a1", "out:a2", "out:a3"], ["out:b1", "out:b2"], ["out:c1"]]
    assert model.batches == [["hold"], ["a1", "a2", "a3", "b1"], ["b2", "c1"]]


def test_full_queue_refuses_at_once_and_accepted_requests_complete():
    model = FakeModel()
    observer = RecordingObserver()

    async def body(batcher):
        holder = await hold_runner(batcher, model)
        accepted = [asyncio.create_task(batcher.submit([i, i])) for i in range(3)]
        await until_queued(batcher, 6)
        started = time.perf_counter()
        with pytest.raises(Overloaded) as refused:
            await batcher.submit(["x"])  # 6 + 1 > 6
        assert time.perf_counter() - started < 0.05
        assert refused.value.status == 503
        assert int(refused.value.headers["Retry-After"]) >= 1
        with pytest.raises(Overloaded):
            await batcher.submit(list(range(7)))  # could never fit on its own
        model.release.set()
        await holder
        return await asyncio.gather(*accepted)

    results = run(body, model, max_queue_images=6, observer=observer)
    assert results == [[f"out:{i}", f"out:{i}"] for i in range(3)]
    assert "x" not in model.seen
    assert observer.rejections == ["queue_full", "queue_full"]


def test_deadline_passed_while_queued_fails_before_inference():
    model = FakeModel()
    observer = RecordingObserver()

    async def body(batcher):
        holder = await hold_runner(batcher, model)
        started = time.perf_counter()
        with pytest.raises(DeadlineExceeded) as late:
            await batcher.submit(["late"], deadline=time.monotonic() + 0.05)
        answered_after = time.perf_counter() - started
        assert batcher.queued_images == 0
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(["already-late"], deadline=time.monotonic() - 1)
        model.release.set()
        await holder
        assert await batcher.submit(["next"]) == ["out:next"]
        return answered_after, late.value

    answered_after, error = run(body, model, observer=observer)
    assert answered_after < 0.5  # answered at its deadline, not when the runner freed up
    assert error.status == 504
    assert "late" not in model.seen and "already-late" not in model.seen
    assert observer.rejections == ["deadline", "deadline"]


def test_disconnected_client_is_dropped_before_inference():
    model = FakeModel()
    observer = RecordingObserver()

    async def body(batcher):
        gone = False

        async def is_disconnected() -> bool:
            return gone

        holder = await hold_runner(batcher, model)
        leaving = asyncio.create_task(batcher.submit(["gone"], is_disconnected=is_disconnected))
        staying = asyncio.create_task(batcher.submit(["stay"], is_disconnected=is_disconnected_never))
        await until_queued(batcher, 2)
        gone = True
        await asyncio.sleep(0.01)  # queued long enough to be asked (probe_after_ms, 5 by default)
        model.release.set()
        await holder
        with pytest.raises(ClientDisconnected):
            await leaving
        return await staying

    async def is_disconnected_never() -> bool:
        return False

    assert run(body, model, observer=observer) == ["out:stay"]
    assert "gone" not in model.seen
    assert observer.rejections == ["disconnected"]


def test_only_requests_that_waited_are_probed_for_a_disconnect():
    model = FakeModel()
    probes: list[str] = []

    def probe(name: str):
        async def is_disconnected() -> bool:
            probes.append(name)
            return False
        return is_disconnected

    async def body(batcher):
        assert await batcher.submit(["fresh"], is_disconnected=probe("fresh")) == ["out:fresh"]  # idle runner: at once
        holder = await hold_runner(batcher, model)
        waiting = asyncio.create_task(batcher.submit(["waited"], is_disconnected=probe("waited")))
        await asyncio.sleep(0.05)
        model.release.set()
        await holder
        return await waiting

    assert run(body, model, probe_after_ms=20) == ["out:waited"]
    assert probes == ["waited"]


def test_cancelled_submit_removes_its_queued_items():
    model = FakeModel()

    async def body(batcher):
        holder = await hold_runner(batcher, model)
        cancelled = asyncio.create_task(batcher.submit(["c1", "c2"]))
        await until_queued(batcher, 2)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert batcher.queued_images == 0
        model.release.set()
        await holder
        return await batcher.submit(["after"])

    assert run(body, model) == ["out:after"]
    assert "c1" not in model.seen and "c2" not in model.seen


def test_failing_batch_fails_only_its_own_requests():
    model = FakeModel(fail_on="bad")

    async def body(batcher):
        holder = await hold_runner(batcher, model)
        tasks = [asyncio.create_task(batcher.submit([item])) for item in ("bad", "a", "b", "c")]
        await until_queued(batcher, 4)
        model.release.set()
        await holder
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        return outcomes, await batcher.submit(["next"])

    outcomes, after = run(body, model, max_batch_size=2)
    assert model.batches[1:3] == [["bad", "a"], ["b", "c"]]
    for failed in outcomes[:2]:
        assert isinstance(failed, InferenceFailed)
        assert failed.status == 500
        assert "vit-test" in failed.message and "boom" not in failed.message
    assert outcomes[2:] == [["out:b"], ["out:c"]]
    assert after == ["out:next"]


def test_a_failing_split_request_does_not_run_its_remaining_items():
    model = FakeModel(fail_on=0)

    async def body(batcher):
        with pytest.raises(InferenceFailed):
            await batcher.submit(list(range(6)))
        return await batcher.submit(["next"])

    assert run(body, model, max_batch_size=2) == ["out:next"]
    assert model.batches == [[0, 1], ["next"]]


def test_batch_key_separates_incompatible_items_oldest_key_first():
    model = FakeModel()

    async def body(batcher):
        holder = await hold_runner(batcher, model)
        order = [("a1", 75), ("b1", 50), ("a2", 75), ("b2", 50), ("a3", 75)]
        tasks = [asyncio.create_task(batcher.submit([item], batch_key=key)) for item, key in order]
        await until_queued(batcher, 5)
        model.release.set()
        await holder
        return await asyncio.gather(*tasks)

    results = run(body, model, max_batch_size=4, max_delay_ms=0)
    assert results == [["out:a1"], ["out:b1"], ["out:a2"], ["out:b2"], ["out:a3"]]
    assert model.batches[1:] == [["a1", "a2", "a3"], ["b1", "b2"]]


def test_another_key_is_not_starved_by_a_busy_key():
    model = FakeModel(delay=0.01)

    async def body(batcher):
        holder = await hold_runner(batcher, model)
        first_a = [asyncio.create_task(batcher.submit([f"a{i}"], batch_key="a")) for i in range(4)]
        lone_b = asyncio.create_task(batcher.submit(["b"], batch_key="b"))
        more_a = [asyncio.create_task(batcher.submit([f"a{i}"], batch_key="a")) for i in range(4, 12)]
        await until_queued(batcher, 13)
        model.release.set()
        await asyncio.gather(holder, lone_b, *first_a, *more_a)

    run(body, model, max_batch_size=4, max_delay_ms=0)
    assert model.batches[1:3] == [["a0", "a1", "a2", "a3"], ["b"]]


def test_event_loop_keeps_running_during_a_slow_batch():
    model = FakeModel(delay=0.3)

    async def body(batcher):
        gaps = []

        async def ticker():
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        assert await batcher.submit(["slow"]) == ["out:slow"]
        ticking.cancel()
        return gaps

    gaps = run(body, model)
    assert len(gaps) > 20
    assert max(gaps) < 0.05


def test_busy_is_true_only_while_a_batch_runs():
    model = FakeModel()

    async def body(batcher):
        assert not batcher.busy
        holder = await hold_runner(batcher, model)
        assert batcher.busy
        model.release.set()
        await holder
        assert not batcher.busy

    run(body, model)


def test_stop_with_drain_answers_everything_queued_then_refuses():
    model = FakeModel(delay=0.02)
    observer = RecordingObserver()

    async def main():
        batcher = MicroBatcher(model, max_batch_size=4, max_delay_ms=10, max_queue_images=64, observer=observer)
        await batcher.start()
        tasks = [asyncio.create_task(batcher.submit([i, i + 100])) for i in range(10)]
        await until_queued(batcher, 16)
        await batcher.stop(drain=True, timeout=5)
        results = [task.result() for task in tasks]  # all done by the time stop() returns
        with pytest.raises(NotReady):
            await batcher.submit(["late"])
        return results

    assert asyncio.run(main()) == [[f"out:{i}", f"out:{i + 100}"] for i in range(10)]
    assert sum(model.sizes) == 20
    assert observer.rejections == ["shutdown"]


def test_stop_without_drain_refuses_queued_work():
    model = FakeModel()

    async def body(batcher):
        holder = await hold_runner(batcher, model)
        queued = asyncio.create_task(batcher.submit(["queued"]))
        await until_queued(batcher, 1)
        stopping = asyncio.create_task(batcher.stop(drain=False, timeout=5))
        with pytest.raises(NotReady):
            await queued
        model.release.set()
        await stopping
        return await holder  # the batch already running still finishes

    assert run(body, model) == ["out:hold"]
    assert "queued" not in model.seen


def test_submit_before_start_is_not_ready():
    async def main():
        with pytest.raises(NotReady):
            await MicroBatcher(FakeModel(), max_batch_size=2, max_delay_ms=0, max_queue_images=4).submit([1])

    asyncio.run(main())


def test_observer_sees_queue_depth_batches_waits_and_rejections():
    model = FakeModel(delay=0.01)
    observer = RecordingObserver()

    async def body(batcher):
        holder = await hold_runner(batcher, model)
        tasks = [asyncio.create_task(batcher.submit([i])) for i in range(3)]
        await until_queued(batcher, 3)
        with pytest.raises(Overloaded):
            await batcher.submit([9])
        await asyncio.sleep(0.03)
        model.release.set()
        await asyncio.gather(holder, *tasks)

    run(body, model, max_batch_size=4, max_queue_images=3, observer=observer)
    assert observer.depths[:4] == [1, 0, 1, 2]  # hold queued, hold taken, then the three arrive
    assert max(observer.depths) == 3 and observer.depths[-1] == 0
    assert [size for size, _ in observer.runs] == [1, 3]
    assert all(seconds >= 0.01 for _, seconds in observer.runs)
    assert len(observer.waits) == 4
    assert max(observer.waits) >= 0.03  # the three waited behind the held batch
    assert observer.rejections == ["queue_full"]


def test_a_broken_observer_does_not_break_serving():
    class Broken:
        def queue_depth(self, images):
            raise RuntimeError("metrics down")

    async def body(batcher):
        return await batcher.submit([1])

    assert run(body, FakeModel(), observer=Broken()) == ["out:1"]


def test_stop_that_times_out_refuses_running_and_queued_work():
    model = FakeModel()

    async def body(batcher):
        holder = await hold_runner(batcher, model)
        queued = asyncio.create_task(batcher.submit(["queued"]))
        await until_queued(batcher, 1)
        await batcher.stop(drain=True, timeout=0.05)
        outcomes = await asyncio.gather(holder, queued, return_exceptions=True)
        assert all(isinstance(outcome, NotReady) for outcome in outcomes)

    run(body, model)
    assert "queued" not in model.seen
