"""The request queue: bounded in images and refused whole with a Retry-After, oldest request first, one
batch key per batch without starving another, and withdrawn images (deadline, client gone, cancelled)
never run. First the RequestQueue on its own, then the same rules seen through a running MicroBatcher."""
from __future__ import annotations

import asyncio
import collections
import time

import pytest
from batcher_harness import FakeModel, RecordingObserver, hold_runner, run, until_queued

from service.batching import ClientDisconnected
from service.errors import DeadlineExceeded, Overloaded
from service.request_queue import AUTO, QueuedRequest, RequestQueue


@pytest.fixture
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def queued(loop, queue: RequestQueue, items, key=None, deadline=None) -> QueuedRequest:
    request = QueuedRequest(list(items), loop.create_future(), loop.time(), deadline, None, key)
    queue.add(request)
    return request


def new_queue(max_images: int = 8, max_batch_size: int = 4, instances: int = 1) -> RequestQueue:
    return RequestQueue(name="vit-test", max_images=max_images, max_batch_size=max_batch_size, instances=instances,
                        retry_spread=lambda: 0)


def test_selection_is_the_oldest_key_in_arrival_order_up_to_a_batch(loop):
    queue = new_queue(max_batch_size=4)
    a1 = queued(loop, queue, ["a1", "a1'"], key="a")
    b1 = queued(loop, queue, ["b1"], key="b")
    a2 = queued(loop, queue, ["a2", "a2'", "a2''"], key="a")
    selection = queue.select()
    assert selection == [(a1, 0, 2), (a2, 0, 2)]  # a2 split: its first two images fill the batch
    assert queue.select() == selection and queue.images == 6  # selecting takes nothing
    assert queue.take(selection) == selection
    assert queue.images == 2 and list(queue) == [b1, a2]  # a1 left the queue, a2 keeps its last image
    assert queue.oldest is b1 and queue.select() == [(b1, 0, 1)]
    queue.take(queue.select())
    assert queue.select() == [(a2, 2, 1)]


def test_next_batch_is_full_counts_only_the_oldest_key(loop):
    queue = new_queue(max_batch_size=2)
    assert not queue.next_batch_is_full()
    queued(loop, queue, ["a"], key="a")
    queued(loop, queue, ["b", "b"], key="b")
    assert not queue.next_batch_is_full()
    queued(loop, queue, ["a"], key="a")
    assert queue.next_batch_is_full()


def test_refusal_counts_staged_images_and_estimates_retry_after_from_batch_times(loop):
    queue = new_queue(max_images=8, max_batch_size=2, instances=2)
    queued(loop, queue, range(6))
    assert queue.refusal(2) is None
    assert queue.refusal(1, staged=2) is not None  # staged images still wait: 6 + 2 + 1 > 8
    assert queue.refusal(3).headers["Retry-After"] == "1"  # no batch timed yet
    queue.record_batch(2, 4.0)
    refused = queue.refusal(3)
    assert "6 images waiting" in refused.message and refused.reason == "queue_full"
    assert refused.headers["Retry-After"] == "6"  # 3 batches of 4 s, two at a time
    assert queue.refusal(3, running=[2, 2]).headers["Retry-After"] == "8"  # + two running batches, half done
    assert queue.refusal(3, staged=2).headers["Retry-After"] == "8"  # 4 batches
    queue.record_batch(2, 9.0)  # the average moves a fifth of the way: 5 s
    assert queue.refusal(3).headers["Retry-After"] == "8"  # 7.5 s
    queue.record_batch(2, 1000.0)
    assert queue.refusal(3).headers["Retry-After"] == "60"  # capped
    too_large = new_queue(max_images=8).refusal(9)
    assert isinstance(too_large, Overloaded) and "exceeds" in too_large.message


def test_clients_refused_together_are_told_to_come_back_at_spread_out_times(loop):
    queue = RequestQueue(name="vit-test", max_images=4, max_batch_size=4, instances=1)  # the default spread
    queue.record_batch(4, 0.4)
    queued(loop, queue, range(4))
    told = collections.Counter(queue.refusal(1).headers["Retry-After"] for _ in range(400))
    assert set(told) == {"1", "2"} and min(told.values()) > 120  # the estimate (1 s), or a second more


def test_refusal_bounds_the_work_ahead_in_time(loop):
    queue = RequestQueue(name="vit-test", max_images=100, max_batch_size=4, instances=1, max_delay_s=1.0,
                         retry_spread=lambda: 0)
    queued(loop, queue, range(8))
    assert queue.refusal(1) is None  # no batch timed yet: only the image bound applies
    queue.record_batch(4, 0.4)
    assert queue.refusal(1) is None  # two batches of 0.4 s ahead
    queued(loop, queue, range(3))
    refused = queue.refusal(1)  # + a batch of 3, not timed yet: 3/4 of 0.4 s
    assert refused.status == 503 and refused.reason == "queue_delay"
    assert "1100 ms of work queued" in refused.message and "limit is 1000 ms" in refused.message
    assert refused.headers["Retry-After"] == "2"
    unbounded = new_queue(max_images=100)
    queued(loop, unbounded, range(11))
    unbounded.record_batch(4, 0.4)
    assert unbounded.refusal(1) is None  # without a time bound, only the image bound and deadlines refuse


def test_the_automatic_time_bound_is_sixteen_images_per_instance_and_at_least_a_second(loop):
    slow = RequestQueue(name="vit-base", max_images=256, max_batch_size=1, instances=2, max_delay_s=AUTO)
    assert slow.delay_bound_s() is None  # nothing timed yet
    slow.record_batch(1, 0.19)  # ViT-Base-like on 2 cores: one image at a time, 0.19 s per instance
    assert slow.delay_bound_s() == pytest.approx(16 * 0.19)
    queued(loop, slow, range(14))  # c=16 at this model: 14 images waiting behind two running ones
    assert slow.refusal(1, running=[1, 1]) is None  # about 1.5 s ahead: normal load is not refused
    queued(loop, slow, range(18))  # 32 waiting: about 3.2 s ahead
    refused = slow.refusal(1, running=[1, 1])
    assert refused.reason == "queue_delay" and "limit is 3040 ms" in refused.message
    fast = RequestQueue(name="vit-tiny", max_images=256, max_batch_size=8, instances=2, max_delay_s=AUTO)
    fast.record_batch(8, 0.15)
    assert fast.delay_bound_s() == 1.0  # 16 images per instance take 0.3 s: under the floor


def test_the_time_bound_never_starves_the_instances(loop):
    queue = RequestQueue(name="vit-test", max_images=100, max_batch_size=4, instances=2, max_delay_s=0.1)
    queue.record_batch(4, 0.8)
    queued(loop, queue, range(4))  # 0.4 s of work ahead, over the bound, but less than a batch per instance
    assert queue.refusal(4, running=[4, 4]) is None
    assert queue.refusal(1, running=[4, 4], deadline_in_s=0.5).reason == "deadline_unreachable"  # deadlines still hold
    queued(loop, queue, range(4))
    assert queue.refusal(1, running=[4, 4]).reason == "queue_delay"


def test_images_being_decoded_count_as_waiting_until_queued_or_released(loop):
    queue = RequestQueue(name="vit-test", max_images=10, max_batch_size=4, instances=1, max_delay_s=1.0)
    queue.record_batch(4, 0.4)
    queued(loop, queue, range(6))
    with queue.reserve(4) as reservation:
        assert queue.refusal(1).reason == "queue_full"  # 6 + 4 reserved + 1 > 10
        request = QueuedRequest(list(range(4)), loop.create_future(), loop.time(), None, None, None)
        queue.add(request, reservation)  # queued: no longer reserved, counted once
        assert queue.images == 10 and queue.wait_s(1)[0] == pytest.approx(1.0)
    assert queue.images == 10  # leaving the block after queueing releases nothing twice
    queue.withdraw(request)
    with queue.reserve(3):
        assert queue.wait_s(1)[0] == pytest.approx(0.9)
    assert queue.wait_s(1)[0] == pytest.approx(0.6) and queue.refusal(4) is None  # released unqueued


def test_the_deadline_estimate_includes_how_long_admitted_requests_take_to_reach_the_queue(loop):
    queue = new_queue(max_images=100, max_batch_size=4, instances=1)
    queue.record_batch(4, 0.4)
    queued(loop, queue, range(4))
    assert queue.wait_s(1) == pytest.approx((0.4, 0.4))
    reservation = queue.reserve(1)
    reservation.admitted_at -= 1.0  # decoding took a second
    queue.add(QueuedRequest(["slow"], loop.create_future(), loop.time(), None, None, None), reservation)
    first, last = queue.wait_s(1)
    assert first == pytest.approx(0.5)  # the queued work ahead
    assert last - first == pytest.approx(0.2, abs=0.01)  # a fifth of the way to the second the last one took
    assert queue.refusal(1, deadline_in_s=0.6).reason == "deadline_unreachable"


def test_refusal_of_a_request_that_would_not_start_before_its_deadline(loop):
    queue = new_queue(max_images=100, max_batch_size=4, instances=2)
    queue.record_batch(4, 0.8)  # 0.2 s per image
    assert queue.refusal(1, running=[4], deadline_in_s=0.001) is None  # an instance is free: it starts at once
    queued(loop, queue, range(8))  # (8 x 0.2 s) / 2 instances = 0.8 s ahead
    assert queue.refusal(1, deadline_in_s=0.9) is None
    late = queue.refusal(1, deadline_in_s=0.5)
    assert late.reason == "deadline_unreachable" and "about 800 ms" in late.message and "500 ms away" in late.message
    assert queue.refusal(1, running=[4, 4], deadline_in_s=0.9).reason == "deadline_unreachable"  # + 2 half-done batches: 1.2 s
    # a request larger than a batch must start its last part in time: 0.8 + (8 - 4) x 0.2 / 2 = 1.2 s
    assert queue.refusal(8, deadline_in_s=1.1).reason == "deadline_unreachable"
    assert queue.refusal(8, deadline_in_s=1.3) is None


def test_a_deadline_too_short_for_an_idle_model_is_not_an_overload(loop):
    queue = new_queue(max_images=100, max_batch_size=4, instances=1)
    queue.record_batch(4, 0.8)
    assert queue.alone_s(8) == pytest.approx(0.8)  # its second part starts after its first, with nothing ahead
    assert queue.refusal(8, deadline_in_s=0.5) is None  # no wait would help: not a 503 (the batcher answers 504)
    queued(loop, queue, range(4))
    assert queue.refusal(8, deadline_in_s=1.0).reason == "deadline_unreachable"  # 0.8 s ahead of it: the queue is why


def test_the_batcher_answers_a_deadline_too_short_for_an_idle_model_with_504():
    model = FakeModel()
    observer = RecordingObserver()

    async def body(batcher):
        batcher.expect_batch_time(4, 0.8)
        with pytest.raises(DeadlineExceeded):
            batcher.admit(8, deadline=time.monotonic() + 0.5)
        with batcher.admit(8, deadline=time.monotonic() + 5):  # the same request with time for it is admitted
            pass

    run(body, model, max_batch_size=4, observer=observer)
    assert observer.rejections == ["deadline"]


def test_withdraw_removes_only_untaken_images_once(loop):
    queue = new_queue(max_batch_size=2)
    request = queued(loop, queue, ["a", "b", "c"])
    other = queued(loop, queue, ["d"])
    queue.take(queue.select())  # a, b are running
    assert queue.withdraw(request)
    assert queue.images == 1 and list(queue) == [other]
    assert not queue.withdraw(request)
    assert queue.images == 1


def test_past_deadline_lists_only_requests_whose_deadline_came(loop):
    queue = new_queue()
    late = queued(loop, queue, ["late"], deadline=10.0)
    queued(loop, queue, ["on time"], deadline=20.0)
    queued(loop, queue, ["no deadline"])
    assert queue.past_deadline(10.0) == [late]


def test_a_request_is_answered_once_every_image_has_a_result(loop):
    request = QueuedRequest(["a", "b", "c"], loop.create_future(), 0.0, None, None, None)
    request.add_results(2, ["C"])
    assert not request.future.done()
    request.add_results(0, ["A", "B"])
    assert request.future.result() == ["A", "B", "C"]
    request.fail(RuntimeError("too late"))  # an answer given stays
    assert request.future.result() == ["A", "B", "C"]


def test_a_failing_or_stuck_disconnect_probe_keeps_the_request(loop):
    async def fails() -> bool:
        raise RuntimeError("probe broke")

    async def hangs() -> bool:
        await asyncio.sleep(10)
        return True

    async def left() -> bool:
        return True

    def client_left(probe) -> bool:
        request = QueuedRequest(["a"], loop.create_future(), 0.0, None, probe, None)
        return loop.run_until_complete(request.client_left())

    assert client_left(left)
    started = time.perf_counter()
    assert not client_left(fails) and not client_left(hangs)
    assert time.perf_counter() - started < 1


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


def test_work_ahead_over_the_time_bound_is_refused_at_once_and_admitted_requests_complete():
    model = FakeModel(delay=0.05)
    observer = RecordingObserver()

    async def body(batcher):
        await batcher.submit(["timed"])  # one batch timed: about 50 ms
        holder = await hold_runner(batcher, model)
        admitted = [asyncio.create_task(batcher.submit([name])) for name in ("a1", "a2")]  # a2: 25 + 50 ms ahead
        await until_queued(batcher, 2)
        started = time.perf_counter()
        with pytest.raises(Overloaded) as refused:
            await batcher.submit(["b"])  # 25 ms (the running batch, half done) + 2 x 50 ms > 100 ms
        assert time.perf_counter() - started < 0.05
        with pytest.raises(Overloaded):
            batcher.admit(1)
        model.release.set()
        await holder
        return await asyncio.gather(*admitted), refused.value

    results, refused = run(body, model, max_batch_size=1, max_queue_delay_ms=100, observer=observer)
    assert results == [["out:a1"], ["out:a2"]] and "b" not in model.seen
    assert "ms of work queued" in refused.message and int(refused.headers["Retry-After"]) >= 1
    assert observer.rejections == ["queue_delay", "queue_delay"]


def test_an_admitted_request_holds_its_place_while_it_is_decoded():
    model = FakeModel()
    observer = RecordingObserver()

    async def body(batcher):
        holder = await hold_runner(batcher, model)
        with batcher.admit(3) as admission:  # decoding...
            with pytest.raises(Overloaded):
                batcher.admit(2)  # 3 reserved + 2 > 4
            queued = asyncio.create_task(batcher.submit(["a", "b", "c"], admission=admission))
            await until_queued(batcher, 3)
        assert batcher.admit(1).images == 1  # 3 queued + 1: fits; the submit released its reservation once
        with pytest.raises(DeadlineExceeded):
            batcher.admit(1, deadline=time.monotonic() - 0.001)  # late before it was admitted: 504, not 503
        batcher._queue._to_queue_s = 0.2  # decoding has been taking 200 ms
        with pytest.raises(DeadlineExceeded):
            batcher.admit(1, deadline=time.monotonic() + 0.1)  # no wait would help: 504, not 503
        batcher._queue._to_queue_s = 0.0
        model.release.set()
        await holder
        return await queued

    assert run(body, model, max_queue_images=4, observer=observer) == ["out:a", "out:b", "out:c"]
    assert observer.rejections == ["queue_full", "deadline", "deadline"]


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
