"""The dynamic batcher's scheduling: batches form under load, never delay a lone request, are staged and
spread over instances, isolate failures, report to the observer and drain on stop. What waits in the queue
and in which order is in test_request_queue.py. Plain asyncio.run, no plugin."""
from __future__ import annotations

import asyncio
import time

import pytest
import uvloop
from batcher_harness import FakeModel, RecordingObserver, hold_runner, run, until_queued

from service.batching import BatchTiming, MicroBatcher
from service.errors import InferenceFailed, NotReady, Overloaded


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


def test_a_request_learns_its_queue_wait_and_inference_time():
    """What the Server-Timing header reports: a lone request waits well under a millisecond (timed with perf_counter,
    not uvloop's whole-millisecond loop clock); one queued behind a held batch waits as long as that batch ran; the
    inference time is its own batch's, as the observer sees it."""
    model = FakeModel(delay=0.02)
    observer = RecordingObserver()

    async def body(batcher):
        lone = BatchTiming()
        await batcher.submit(["a"], timing=lone)
        held = await hold_runner(batcher, model)
        behind = BatchTiming()
        waiting = asyncio.ensure_future(batcher.submit(["b"], timing=behind))
        await asyncio.sleep(0.05)
        model.release.set()
        await held
        await waiting
        return lone, behind

    lone, behind = run(body, model, loop_factory=uvloop.new_event_loop, observer=observer, instances=1)
    assert 0 < lone.queued_s < 0.001 and observer.waits[0] == lone.queued_s  # the metric's wait is the header's
    assert lone.inference_s == observer.runs[0][1] and lone.inference_s >= 0.02
    assert behind.queued_s >= 0.05 and behind.inference_s == observer.runs[-1][1]


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
        with pytest.raises(InferenceFailed):  # fails while its second part still runs (held)
            await batcher.submit(["bad", "p1", "hold", "p3", "p4", "p5", "p6", "p7"])
        model.release.set()
        await asyncio.sleep(0.05)

    run(body, model, max_batch_size=2, max_delay_ms=0, instances=2)
    # two parts start at once on the two instances; none is staged behind its own request's parts, and once the
    # request has failed, the instance freed by the held part starts none of the rest
    assert sorted(map(tuple, model.batches)) == [("bad", "p1"), ("hold", "p3")]


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
