"""What one running server holds: its models (kept in step with the repository by `ModelControl`), the decode pool,
and whether it is ready."""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .errors import NotFound, NotReady
from .images import ImageLimits
from .loading import settle_garbage_collector, start_version, stop_version
from .metrics import Metrics
from .model_control import ModelControl
from .runtime import cuda_available
from .served import ServedModel
from .settings import Settings

log = logging.getLogger("vitserve")

__all__ = ["ServedModel", "ServiceState"]


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    draining: bool = False
    decode_pool: ThreadPoolExecutor | None = None
    # Set by the process that owns the interpreter (`vit-serve`), not by an app hosted in someone else's (tests):
    # tune the garbage collector once the models are loaded (service.loading.settle_garbage_collector).
    settle_collector: bool = False
    control: ModelControl = field(init=False)
    requests_at_work: int = 0  # admitted and not answered yet, over every model and protocol (see `at_work`)

    def __post_init__(self) -> None:
        self.control = ModelControl(self.settings, self.metrics,
                                    start=functools.partial(start_version, self.settings, self.metrics),
                                    stop=functools.partial(stop_version, timeout_s=self.settings.drain_timeout_s),
                                    draining=lambda: self.draining)

    @contextlib.contextmanager
    def at_work(self) -> Iterator[None]:
        """Counts a request from its admission to its answer: decoding, queued or running on any model."""
        self.requests_at_work += 1
        try:
            yield
        finally:
            self.requests_at_work -= 1

    @property
    def alone_at_work(self) -> bool:
        """Whether the request asking is the only one at work: nothing else needs the event loop or the cores."""
        return self.requests_at_work <= 1

    @property
    def models(self) -> dict[str, ServedModel]:
        """The newest served version of each model, by name."""
        return self.control.served_models()

    @property
    def problems(self) -> list[str]:
        return self.control.problems

    @property
    def not_ready_reasons(self) -> list[str]:
        return (["the server is shutting down"] if self.draining else []) + self.problems

    @property
    def ready(self) -> bool:
        return not self.not_ready_reasons

    @property
    def limits(self) -> ImageLimits:
        s = self.settings
        return ImageLimits(max_pixels=s.max_pixels, max_images=s.max_images_per_request, max_body_bytes=s.max_body_bytes)

    async def load(self) -> None:
        """Load, warm up and start the models; a failure is kept as a readiness problem, the process stays up."""
        settings = self.settings
        # Half the cores decode by default: with all of them, decoding fought onnxruntime for the CPU
        # (bench, ViT-Tiny c=16 on 2 cores: vitserve / raw ORT 0.79 with 2 decode threads, 0.86 with 1).
        self.decode_pool = ThreadPoolExecutor(settings.decode_threads or max(1, settings.cores // 2), thread_name_prefix="decode")
        if settings.device == "auto" and not cuda_available():  # said once, not once per model
            log.info("no CUDA provider in this onnxruntime: serving on the CPU")
        await self.control.start()
        if self.settle_collector:
            settle_garbage_collector()

    async def drain(self) -> None:
        """Stop admitting, finish what was accepted (bounded by the drain timeout), release the threads."""
        self.draining = True
        served = await self.control.stop()
        await asyncio.gather(*(m.batcher.stop(drain=True, timeout=self.settings.drain_timeout_s) for m in served))
        if self.decode_pool:
            self.decode_pool.shutdown(wait=False, cancel_futures=True)

    def model_for(self, task: str, name: str | None, version: int | None = None) -> ServedModel:
        """The model a task request names (the only one of its task when it names none), at `version` or the newest."""
        if self.draining:
            raise NotReady("the server is shutting down")
        models = self.models
        candidates = [m for m in models.values() if m.metadata.task == task]
        if name is not None:
            model = models.get(name)
            if model is None:
                raise NotFound(f"no {task} model named {name!r} (available: {', '.join(m.name for m in candidates) or 'none'})")
            if model.metadata.task != task:
                raise NotFound(f"no {task} model named {name!r}; {name} serves the {model.metadata.task} task "
                               f"(available: {', '.join(m.name for m in candidates) or 'none'})")
            return self.control.version(name, version)
        if not candidates:
            if self.problems:
                raise NotReady(f"no {task} model is ready: {'; '.join(self.problems)}")
            raise NotFound(f"this server has no {task} model")
        return self.control.version(candidates[0].name, version)
