"""Turning a version directory into a running `ServedModel`, and back: sessions opened, batch size timed, warmed up
and batcher started before the version takes any traffic; on retirement, the requests that hold it answered, its
batcher drained, its sessions dropped and the memory handed back to the system."""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import time

from .batching import MicroBatcher
from .metrics import Metrics
from .repository import ModelVersion
from .priority import in_inference_thread
from .runtime import CPU, CUDA, load_model, wants_cuda
from .served import ServedModel
from .settings import Settings

log = logging.getLogger("vitserve")


async def start_version(settings: Settings, metrics: Metrics, entry: ModelVersion) -> ServedModel:
    """Everything a version needs before its first request; the blocking part runs in a worker thread."""
    started = time.perf_counter()
    served = await in_inference_thread(_open_version, settings, metrics, entry)  # its thread pools inherit the priority
    await served.batcher.start()
    served.load_s = time.perf_counter() - started
    return served


def _open_version(settings: Settings, metrics: Metrics, entry: ModelVersion) -> ServedModel:
    instances = settings.instances_for(CUDA if settings.runtime == "onnxruntime" and wants_cuda(settings.device) else CPU)
    loaded = load_model(entry, device=settings.device, variant=settings.variant,
                        intra_op_threads=settings.intra_op_threads_for(instances), spin_us=settings.intra_op_spin_us,
                        solo_threads=settings.solo_threads_for(instances) if instances > 1 and settings.solo_all_cores else None,
                        runtime=settings.runtime, precision=settings.precision, instances=instances)
    max_batch, per_image = settings.batch_size_for(loaded.provider), {}
    if max_batch is None:
        max_batch, per_image = loaded.efficient_batch_size()
        max_batch = min(max_batch, settings.max_queue_images)  # a batch must be able to fill
        log.info("%s v%d: max batch size %d (seconds per image by batch size: %s)", entry.name, entry.version, max_batch,
                 ", ".join(f"{b}: {t:.4f}" for b, t in per_image.items()))
    loaded.warm_up((1, max_batch))
    batcher = MicroBatcher(loaded.run_items, max_batch_size=max_batch, max_delay_ms=settings.max_delay_ms,
                           max_queue_images=settings.max_queue_images, max_queue_delay_ms=settings.max_queue_delay_ms,
                           observer=metrics.observer(entry.name),
                           name=entry.name, instances=instances,
                           run_alone=lambda items: loaded.run_items(items, alone=True))
    # The batch sizes timed at start are the queue's first estimates: admission by time holds from the first request
    # (a burst at start, or onto a version swapped in under load, is not all admitted before a batch has run).
    for size, seconds_per_image in per_image.items():
        if size <= max_batch:
            batcher.expect_batch_time(size, seconds_per_image * size)
    return ServedModel(loaded, batcher, max_batch)


async def stop_version(served: ServedModel, timeout_s: float) -> None:
    """Called once the version takes no new requests: wait for the requests that hold it (up to `timeout_s`), drain
    its batcher, then let its sessions go."""
    if not await served.wait_released(timeout_s):
        log.warning("%s v%d: %d request(s) still hold it after %.0f s; stopping it anyway", served.name, served.version,
                    served.leases, timeout_s)
    await served.batcher.stop(drain=True, timeout=timeout_s)
    served.loaded.release()
    await asyncio.to_thread(give_memory_back)


# Allocations (net of frees) between two passes over the youngest generation; Python's default is 700. Requests leave no
# reference cycles (tests/test_request_garbage.py), so these passes free next to nothing, yet each walks the requests in
# flight with the event loop stopped. ViT-Tiny at c=256 for 50 s: 250 passes (22 of the middle generation, 5-10 ms
# each) with the default, 10 with this; refusal p99 11-12 -> 6-7 ms.
YOUNG_PASS_ALLOCATIONS = 10_000


def settle_garbage_collector() -> None:
    """Once the models are loaded: move what start-up made (modules, the app, the models' Python side: about 80,000
    objects that live as long as the process) out of the collector's sight, where each full pass walked all of it
    (40-70 ms every few seconds under load; 9 ms once frozen), and space the young passes out."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_PASS_ALLOCATIONS, *gc.get_threshold()[1:])


def give_memory_back() -> None:
    """Collect the dropped sessions now and return freed heap pages to the system: onnxruntime frees its arenas
    into malloc, and glibc keeps freed memory in the process unless asked (so RSS would not fall after an unload)."""
    gc.collect()
    if _libc is not None:
        _libc.malloc_trim(0)


def _load_libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None  # glibc only (not musl, not macOS)


_libc = _load_libc()
