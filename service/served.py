"""One model version as served: its session(s), its batcher, and the requests that hold it (leases).

A request leases the version it was routed to for its whole life (decode, queue, inference, response), so that a
version being replaced is stopped only after every request routed to it has its answer: a swap fails nothing."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from modelrepo import ModelMetadata

from .batching import MicroBatcher
from .images import ResizeSpec
from .repository import ModelVersion
from .runtime import LoadedModel


@dataclass(eq=False)
class ServedModel:
    loaded: LoadedModel
    batcher: MicroBatcher
    max_batch_size: int
    load_s: float = 0.0  # from reading the files to taking traffic (sessions, batch-size timing, warm-up)
    leases: int = 0
    _released: asyncio.Event = field(default_factory=asyncio.Event)

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

    @contextlib.contextmanager
    def lease(self) -> Iterator[ServedModel]:
        """Held by a request from routing to its answer."""
        self.leases += 1
        self._released.clear()
        try:
            yield self
        finally:
            self.leases -= 1
            if self.leases == 0:
                self._released.set()

    async def wait_released(self, timeout_s: float) -> bool:
        """Until no request holds this version (True), or `timeout_s` passed (False)."""
        if self.leases == 0:
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._released.wait(), timeout_s)
        return self.leases == 0
