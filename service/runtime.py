"""One inference session per model version (onnxruntime or OpenVINO, see service.runtimes): provider choice (never a
silent fallback), threads, warm-up."""
from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from modelrepo import ModelMetadata
from modelrepo.names import ATTENTION, IMAGES, KEEP

from .repository import ModelVersion
from .runtimes import Session, openvino_installed
from .runtimes.onnxruntime import CPU, CUDA, cuda_available, open_ort

log = logging.getLogger("vitserve.runtime")

Item = dict[str, np.ndarray]  # one image's inputs (or outputs), by tensor name
# An item's entry naming optional outputs to compute besides the graph's own (ATTENTION: the attention graph
# runs too); never a tensor name. Work that sets it has a batch key of its own, so a batch agrees on it.
FETCH_ALSO = "+fetch"


class RuntimeStartError(Exception):
    """A model that cannot be served as configured (the message says what to change)."""


@dataclass
class LoadedModel:
    entry: ModelVersion
    session: Session
    variant: str
    runtime: str = "onnxruntime"
    warmup_s: float = 0.0
    # CPU with several instances: the same graph on all cores, for a batch that runs alone (see `run`)
    solo_session: Session | None = None
    # Opens the attention graph (classifiers exported with one) in the same runtime; called on the first request that
    # asks for a map, so a server whose clients never do holds no second copy of the weights.
    open_attention: Callable[[], Session] | None = None
    _attention: Session | None = field(default=None, repr=False)
    _attention_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.provider, self.precision = self.session.provider, self.session.precision

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def metadata(self) -> ModelMetadata:
        return self.entry.metadata

    def run_items(self, items: list[Item], alone: bool = False) -> list[Item]:
        """Stack the images' inputs into one batch, run it, split the outputs back per image. An input without a
        batch axis (the reconstructor's `keep`) is one value per batch: the batcher's batch key keeps it equal."""
        feeds = {spec.name: np.stack([item[spec.name] for item in items]) if spec.batched else np.asarray(items[0][spec.name])
                 for spec in self.metadata.inputs}
        outputs = self.run(feeds, alone=alone)
        if ATTENTION in items[0].get(FETCH_ALSO, ()):
            outputs[ATTENTION] = self.attention_session().run({IMAGES: feeds[IMAGES]})[ATTENTION]
        return [{name: value[i] for name, value in outputs.items()} for i in range(len(items))]

    def attention_session(self) -> Session:
        """The attention graph's session, opened on first use (by one batch thread; the others wait for it)."""
        if self.open_attention is None:
            raise RuntimeError(f"{self.name} v{self.entry.version} has no attention graph")
        with self._attention_lock:
            if self._attention is None:
                started = time.perf_counter()
                self._attention = self.open_attention()
                log.info("%s: attention graph opened in %.2fs", self.name, time.perf_counter() - started)
            return self._attention

    def run(self, feeds: dict[str, np.ndarray], alone: bool = False) -> dict[str, np.ndarray]:
        """Run one batch. `alone`: nothing else runs now, so use all cores (the solo session) when there is one."""
        session = self.solo_session if alone and self.solo_session is not None else self.session
        return session.run(feeds)

    def release(self) -> None:
        """Drop the sessions (the version was retired); whoever still runs a batch on one keeps it alive until done."""
        self.session = self.solo_session = self._attention = self.open_attention = None

    def dummy_feeds(self, batch: int) -> dict[str, np.ndarray]:
        """Zeros of every input's shape and dtype (keep: the default number of visible patches)."""
        feeds = {spec.name: np.zeros([batch if spec.batched and i == 0 else d for i, d in enumerate(spec.shape)], dtype=spec.dtype)
                 for spec in self.metadata.inputs}
        if KEEP in feeds:
            feeds[KEEP] = np.array(self.metadata.default_keep, dtype=np.int64)
        return feeds

    def warm_up(self, batch_sizes: tuple[int, ...]) -> None:
        """Run once per batch size so that the first real request does not pay for allocations and kernel choice."""
        started = time.perf_counter()
        for batch in sorted(set(batch_sizes)):
            self.run(self.dummy_feeds(batch))
            if self.solo_session is not None:
                self.run(self.dummy_feeds(batch), alone=True)
        self.warmup_s = time.perf_counter() - started

    def efficient_batch_size(self, candidates: tuple[int, ...] = (1, 2, 4, 8), tolerance: float = 0.05,
                             repeats: int = 3) -> tuple[int, dict[int, float]]:
        """The smallest batch whose time per image is within `tolerance` of the best, timed on the instance session.

        On a CPU a ViT's matrix products are already large at batch 1: a bigger batch costs about as much per image
        and only adds latency (ViT-Tiny on one thread: batch 8 is 13% slower per image than batch 1), while small
        models gain from batching. Larger batches are tried only while they keep improving."""
        per_image: dict[int, float] = {}
        for batch in sorted(candidates):
            feeds = self.dummy_feeds(batch)
            self.run(feeds)  # allocations for this shape
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                self.run(feeds)
                times.append(time.perf_counter() - started)
            per_image[batch] = min(times) / batch
            if per_image[batch] > (1 + tolerance) * min(per_image.values()):
                break
        best = min(per_image.values())
        return min(b for b, t in per_image.items() if t <= (1 + tolerance) * best), per_image


def choose_variant(entry: ModelVersion, requested: str, on_cuda: bool) -> str:
    if requested == "auto":
        return "fp16" if on_cuda and entry.variant_path("fp16") else "fp32"
    if entry.variant_path(requested) is None:
        present = entry.variants_present()
        flag = {"int8": "--int8", "int8-static": "--int8 static", "fp16": "--fp16"}.get(requested)
        raise RuntimeStartError(f"model {entry.name} v{entry.version} has no {requested} variant (it has: {', '.join(present)}); "
                                f"export it with vit-export {flag}" if flag else f"{entry.path} has no model.onnx")
    return requested


def wants_cuda(device: str) -> bool:
    """Whether `device` asks for the CUDA provider: always for "cuda", for "auto" when it is installed."""
    return device == "cuda" or (device == "auto" and cuda_available())


def load_model(entry: ModelVersion, *, device: str, variant: str, intra_op_threads: int, spin_us: int | None = None,
               solo_threads: int | None = None, runtime: str = "onnxruntime", precision: str = "auto",
               instances: int = 1) -> LoadedModel:
    """Create the session on the requested device and check which provider really runs it. With `solo_threads`
    (more than `intra_op_threads`), a CPU model gets a second session on that many threads for lone batches.
    `instances`: how many batches may run on the session at once (OpenVINO gives each its own stream)."""
    if runtime == "openvino":
        return _load_openvino(entry, variant=variant, threads=intra_op_threads, solo_threads=solo_threads,
                              precision=precision, instances=instances)
    want_cuda = wants_cuda(device)
    if device == "cuda" and not cuda_available():
        raise RuntimeStartError("--device cuda, but this onnxruntime has no CUDA provider (install onnxruntime-gpu)")
    chosen = choose_variant(entry, variant, want_cuda)
    session = _session(entry, chosen, [CUDA, CPU] if want_cuda else [CPU], intra_op_threads, spin_us)
    active = session.provider
    if want_cuda and active != CUDA:
        if device == "cuda":
            raise RuntimeStartError(f"--device cuda, but CUDA did not load for {entry.name} (active: {active}); check the CUDA/cuDNN libraries")
        log.warning("CUDA provider is installed but did not load for %s: serving on CPU", entry.name)
        if variant == "auto" and chosen != "fp32":  # the fp16 graph was picked for a GPU that is not there
            chosen, session = "fp32", _session(entry, "fp32", [CPU], intra_op_threads, spin_us)
    loaded = LoadedModel(entry, session, chosen)
    if entry.metadata.attention is not None:
        loaded.open_attention = functools.partial(open_ort, entry.path / entry.metadata.attention.file,
                                                  [active] if active == CPU else [CUDA, CPU], intra_op_threads, spin_us)
    if active == CPU and solo_threads is not None and solo_threads > intra_op_threads:
        loaded.solo_session = _session(entry, chosen, [CPU], solo_threads, spin_us)
    return loaded


def _session(entry: ModelVersion, variant: str, providers: list[str], intra_op_threads: int,
             spin_us: int | None) -> Session:
    return open_ort(entry.variant_path(variant), providers, intra_op_threads, spin_us)


def _load_openvino(entry: ModelVersion, *, variant: str, threads: int, solo_threads: int | None, precision: str,
                   instances: int) -> LoadedModel:
    """The same graph file in OpenVINO on the CPU: a stream per instance, and an all-cores one for lone batches."""
    if not openvino_installed():
        raise RuntimeStartError("--runtime openvino, but OpenVINO is not installed: pip install 'vitserve[openvino]'")
    from .runtimes.openvino import OpenVinoSession, resolve_precision

    try:
        precision = resolve_precision(precision)
    except ValueError as error:
        raise RuntimeStartError(str(error)) from None
    chosen = choose_variant(entry, variant, on_cuda=False)
    path = entry.variant_path(chosen)
    loaded = LoadedModel(entry, OpenVinoSession(path, threads=threads, streams=instances, precision=precision), chosen,
                         runtime="openvino")
    if entry.metadata.attention is not None:
        loaded.open_attention = functools.partial(OpenVinoSession, entry.path / entry.metadata.attention.file,
                                                  threads=threads, streams=instances, precision=precision)
    if solo_threads is not None and solo_threads > threads:
        loaded.solo_session = OpenVinoSession(path, threads=solo_threads, streams=1, precision=precision)
    return loaded
