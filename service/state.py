"""What one running server holds: its models, their batchers, the decode pool, and whether it is ready."""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from modelrepo import ModelMetadata

from .batching import MicroBatcher
from .errors import NotFound, NotReady
from .images import ImageLimits, ResizeSpec
from .metrics import Metrics
from .repository import ModelVersion, find_models
from .runtime import CPU, CUDA, LoadedModel, cuda_available, load_model, wants_cuda
from .settings import Settings

log = logging.getLogger("vitserve")


@dataclass
class ServedModel:
    """One model version as served: its session(s), its batcher and how its images are resized."""
    loaded: LoadedModel
    batcher: MicroBatcher
    max_batch_size: int

    @property
    def entry(self) -> ModelVersion:
        return self.loaded.entry

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def version(self) -> int:
        return self.entry.version

    @property
    def metadata(self) -> ModelMetadata:
        return self.entry.metadata

    @property
    def resize(self) -> ResizeSpec:
        return self.entry.resize

    @property
    def labels(self) -> tuple[str, ...]:
        return self.metadata.classification.labels


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    models: dict[str, ServedModel] = field(default_factory=dict)
    problems: list[str] = field(default_factory=lambda: ["models are loading"])
    draining: bool = False
    decode_pool: ThreadPoolExecutor | None = None

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
        """Load, warm up and start every model; a failure is kept as a readiness problem, the process stays up."""
        settings = self.settings
        # Half the cores decode by default: with all of them, decoding fought onnxruntime for the CPU
        # (bench, ViT-Tiny c=16 on 2 cores: vitserve / raw ORT 0.79 with 2 decode threads, 0.86 with 1).
        self.decode_pool = ThreadPoolExecutor(settings.decode_threads or max(1, settings.cores // 2), thread_name_prefix="decode")
        if settings.device == "auto" and not cuda_available():  # said once, not once per model
            log.info("no CUDA provider in this onnxruntime: serving on the CPU")
        try:
            entries, unservable = find_models(settings.repo, settings.models or None, settings.pin_versions)
        except Exception as error:  # noqa: BLE001 - any repository problem becomes a readiness reason
            self.problems = [str(error)]
            log.error("cannot serve the repository: %s", error)
            return
        problems = [f"model {bad.name} cannot be served: {bad.reason}" for bad in unservable]
        for problem in problems:
            log.error("%s", problem)
        for entry in entries:
            try:
                served = await asyncio.to_thread(self._start_model_sync, entry)
                await served.batcher.start()
                self.models[entry.name] = served
                loaded = served.loaded
                log.info("serving %s v%d (%s) on %s, variant %s, warm-up %.2fs", entry.name, entry.version, entry.task,
                         loaded.provider, loaded.variant, loaded.warmup_s)
            except Exception as error:  # noqa: BLE001
                problems.append(f"model {entry.name} failed to load: {error}")
                log.error("model %s failed to load: %s", entry.name, error)
        self.problems = problems

    def _start_model_sync(self, entry: ModelVersion) -> ServedModel:
        settings = self.settings
        instances = settings.instances_for(CUDA if wants_cuda(settings.device) else CPU)
        loaded = load_model(entry, device=settings.device, variant=settings.variant,
                            intra_op_threads=settings.intra_op_threads_for(instances), spin_us=settings.intra_op_spin_us,
                            solo_threads=settings.solo_threads_for(instances) if instances > 1 and settings.solo_all_cores else None)
        max_batch = settings.batch_size_for(loaded.provider)
        if max_batch is None:
            max_batch, per_image = loaded.efficient_batch_size()
            max_batch = min(max_batch, settings.max_queue_images)  # a batch must be able to fill
            log.info("%s: max batch size %d (seconds per image by batch size: %s)", entry.name, max_batch,
                     ", ".join(f"{b}: {t:.4f}" for b, t in per_image.items()))
        loaded.warm_up((1, max_batch))
        self.metrics.model_info.labels(entry.name, str(entry.version), entry.task, loaded.provider, loaded.variant).set(1)
        batcher = MicroBatcher(loaded.run_items, max_batch_size=max_batch, max_delay_ms=settings.max_delay_ms,
                               max_queue_images=settings.max_queue_images, observer=self.metrics.observer(entry.name),
                               name=entry.name, instances=instances,
                               run_alone=lambda items: loaded.run_items(items, alone=True))
        return ServedModel(loaded, batcher, max_batch)

    async def drain(self) -> None:
        """Stop admitting, finish what was accepted (bounded by the drain timeout), release the threads."""
        self.draining = True
        await asyncio.gather(*(m.batcher.stop(drain=True, timeout=self.settings.drain_timeout_s) for m in self.models.values()))
        if self.decode_pool:
            self.decode_pool.shutdown(wait=False, cancel_futures=True)

    def model_for(self, task: str, name: str | None) -> ServedModel:
        if self.draining:
            raise NotReady("the server is shutting down")
        candidates = sorted((m for m in self.models.values() if m.metadata.task == task), key=lambda m: m.name)
        if name is not None:
            for model in candidates:
                if model.name == name:
                    return model
            other = self.models.get(name)
            hint = f"; {name} serves the {other.metadata.task} task" if other else ""
            raise NotFound(f"no {task} model named {name!r}{hint} (available: {', '.join(m.name for m in candidates) or 'none'})")
        if not candidates:
            if self.problems:
                raise NotReady(f"no {task} model is ready: {'; '.join(self.problems)}")
            raise NotFound(f"this server has no {task} model")
        return candidates[0]
