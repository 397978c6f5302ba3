"""Prometheus metrics, one registry per app. Labels are route templates and model names, never raw paths."""
from __future__ import annotations

from prometheus_client import (
    CollectorRegistry, Counter, Gauge, GCCollector, Histogram, ProcessCollector, generate_latest,
)

LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # The process's resident memory and CPU (process_*), and the garbage collector's passes and what they freed
        # (python_gc_*): a path that leaves reference cycles behind shows as objects collected per second.
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        self.requests = Counter("vitserve_requests_total", "HTTP requests by route and status", ["route", "method", "status"], registry=r)
        self.latency = Histogram("vitserve_request_duration_seconds", "HTTP request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.images = Counter("vitserve_images_inferred_total", "Images that went through a model", ["model"], registry=r)
        self.batch_size = Histogram("vitserve_batch_size", "Images per inference batch", ["model"], buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("vitserve_queue_depth_images", "Images waiting for a batch", ["model"], registry=r)
        self.queue_wait = Histogram("vitserve_queue_wait_seconds", "Time an image waited before its batch started", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("vitserve_inference_seconds", "Time of one batch in the runtime", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.rejections = Counter("vitserve_rejections_total", "Requests refused or dropped, by reason", ["model", "reason"], registry=r)
        self.model_info = Gauge("vitserve_model_info", "Served model versions (value 1)", ["model", "version", "task", "provider", "variant", "precision"], registry=r)
        self.served_version = Gauge("vitserve_model_served_version", "The newest version of a model that takes requests", ["model"], registry=r)
        self.model_loads = Counter("vitserve_model_loads_total", "Attempts to load a model version, by outcome (success, failure)", ["model", "outcome"], registry=r)
        self.model_unloads = Counter("vitserve_model_unloads_total", "Model versions stopped (replaced, unloaded or removed)", ["model"], registry=r)
        self.model_load_seconds = Histogram("vitserve_model_load_seconds", "From reading a version's files to taking traffic", ["model"], buckets=LOAD_BUCKETS, registry=r)
        self.repository_scans = Counter("vitserve_repository_scans_total", "Scans of the model repository (at start, and each poll)", registry=r)
        self.ready = Gauge("vitserve_ready", "1 while /readyz answers 200 (models loaded, not draining), else 0", registry=r)
        self._info_series: dict[str, list[tuple[str, ...]]] = {}

    def show_models(self, name: str, served: list) -> None:
        """One `vitserve_model_info` series per served version of model `name` (a retired one disappears)."""
        for labels in self._info_series.pop(name, []):
            self.model_info.remove(*labels)
        series = [(name, str(m.version), m.metadata.task, m.loaded.provider, m.loaded.variant, m.loaded.precision)
                  for m in served]
        for labels in series:
            self.model_info.labels(*labels).set(1)
        self._info_series[name] = series

    def observer(self, model: str) -> "BatchMetrics":
        return BatchMetrics(self, model)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class BatchMetrics:
    """What one model's batcher reports, bound to that model's label."""

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.metrics, self.model = metrics, model

    def queue_depth(self, images: int) -> None:
        self.metrics.queue_depth.labels(self.model).set(images)

    def batch_run(self, size: int, inference_s: float) -> None:
        self.metrics.batch_size.labels(self.model).observe(size)
        self.metrics.inference.labels(self.model).observe(inference_s)
        self.metrics.images.labels(self.model).inc(size)

    def queue_wait(self, seconds: float) -> None:
        self.metrics.queue_wait.labels(self.model).observe(seconds)

    def rejected(self, reason: str) -> None:
        self.metrics.rejections.labels(self.model, reason).inc()
