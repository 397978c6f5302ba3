"""Which model versions this server serves, kept in step with the repository while it runs.

Modes (`--model-control`): `none` reads the repository once at start; `poll` rescans it every `--repository-poll-s`;
`explicit` loads and unloads only when the repository API asks (the models of `--models`, or all, at start).

For each model, its version policy (`modelrepo.policy`) chooses versions among those on disk that can be loaded. A
new version is loaded, timed and warmed before it is routed to; only then do the versions it replaces stop taking
requests, and they are stopped once every request routed to them has its answer (`ServedModel.lease`). A version
that fails to load is reported (index, /models, metrics, log) and never replaces a working one; it is tried again
only when its files change (a half-copied directory becomes whole).

Every change runs under one lock, so a poll and an API call never load the same version twice."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from modelrepo import InvalidPolicy, VersionPolicy, model_names, read_version_policy, versions

from .errors import BadRequest, Conflict, NotFound
from .metrics import Metrics
from .repository import Fingerprint, ModelVersion, fingerprint, read_version
from .served import ServedModel
from .settings import Settings

log = logging.getLogger("vitserve")

State = Literal["LOADING", "READY", "UNLOADING", "UNAVAILABLE"]  # the repository index's states, as Triton names them
Starter = Callable[[ModelVersion], Awaitable[ServedModel]]
Stopper = Callable[[ServedModel], Awaitable[None]]


class LoadFailed(BadRequest):
    """The repository API asked for a model none of whose chosen versions loads."""


@dataclass
class VersionStatus:
    state: State
    reason: str = ""
    failed: Fingerprint | None = None  # the files that failed to load, when it failed


@dataclass
class ModelSlot:
    """One model: the versions taking requests, and the status of every version it has had."""
    name: str
    served: dict[int, ServedModel] = field(default_factory=dict)
    files: dict[int, Fingerprint] = field(default_factory=dict)  # of each served version, when it was loaded
    status: dict[int, VersionStatus] = field(default_factory=dict)
    problem: str | None = None  # why it serves nothing, or why its policy cannot be read
    # Counts for readiness: found by the first scan, or has served since. A model that appears later and fails to
    # load is reported, but does not take the server (in Kubernetes: every pod at once) out of service.
    required: bool = False

    def newest(self) -> ServedModel | None:
        return self.served[max(self.served)] if self.served else None


class ModelControl:
    def __init__(self, settings: Settings, metrics: Metrics, start: Starter, stop: Stopper,
                 draining: Callable[[], bool] = lambda: False) -> None:
        self.settings, self.metrics = settings, metrics
        self._start, self._stop, self._draining = start, stop, draining
        self.slots: dict[str, ModelSlot] = {}
        self.repository_problem: str | None = None
        self.missing: list[str] = []  # poll and explicit modes: models named by --models that the repository lacks
        self.started = False  # the first scan is done
        # explicit mode: the models loaded at start (--models, or every model); later only load and unload change them
        self._initial: set[str] = set(settings.models)
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task] = set()
        self._leaving: dict[tuple[str, int], str] = {}  # versions out of routing whose requests are finishing: why
        self._warned_pins: set[str] = set()
        self._poller: asyncio.Task | None = None

    @property
    def mode(self) -> str:
        return self.settings.model_control

    # ---- what is served ------------------------------------------------------------------------

    def served(self, name: str) -> ServedModel | None:
        slot = self.slots.get(name)
        return slot.newest() if slot else None

    def served_models(self) -> dict[str, ServedModel]:
        """The newest served version of every model that serves one, by name."""
        return {name: newest for name, slot in sorted(self.slots.items()) if (newest := slot.newest()) is not None}

    def served_versions(self, name: str) -> list[int]:
        slot = self.slots.get(name)
        return sorted(slot.served) if slot else []

    def version(self, name: str, version: int | None) -> ServedModel:
        """The served `version` of `name` (the newest when None); NotFound says what is served instead."""
        slot = self.slots.get(name)
        if slot is None or not slot.served:
            served = ", ".join(self.served_models()) or "none"
            why = f" ({slot.problem})" if slot is not None and slot.problem else ""
            raise NotFound(f"unknown model '{name}'{why} (served: {served})")
        if version is None:
            return slot.newest()
        if version not in slot.served:
            status = slot.status.get(version)
            why = f": {status.state.lower()}{', ' + status.reason if status.reason else ''}" if status else ""
            raise NotFound(f"model '{name}' has no version '{version}' being served{why} "
                           f"(served: {', '.join(str(v) for v in sorted(slot.served))})")
        return slot.served[version]

    @property
    def problems(self) -> list[str]:
        """Why the server is not ready: a repository it cannot serve, or a wanted model with no served version."""
        if not self.started:
            return ["models are loading"]
        if self.repository_problem:
            return [self.repository_problem]
        problems = [f"model(s) {', '.join(self.missing)} not in {self.settings.repo}"] if self.missing else []
        problems += [f"model {name} has no served version: {slot.problem or 'not loaded'}"
                     for name, slot in sorted(self.slots.items()) if slot.required and not slot.served]
        if not self.slots:
            problems.append("no model is loaded" + (": load one with POST /v2/repository/models/NAME/load"
                                                    if self.mode == "explicit" else ""))
        return problems

    # ---- life cycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """The first scan (every mode), then the poll loop in poll mode."""
        if self.mode == "explicit" and not self._initial:
            self._initial = set(model_names(self.settings.repo))
        try:
            await self.reconcile()
        finally:
            self.started = True
        if self.mode == "poll":
            self._poller = asyncio.create_task(self._poll_forever(), name="repository-poll")

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.repository_poll_s)
            try:
                await self.reconcile()
            except Exception:  # noqa: BLE001 - a bad scan must not end polling
                log.exception("scanning the model repository failed")

    async def stop(self) -> list[ServedModel]:
        """No more changes; returns what is still served (the caller drains it), after the retirements finish."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        async with self._lock:
            if self._retiring:
                await asyncio.gather(*self._retiring, return_exceptions=True)
            return [model for slot in self.slots.values() for model in slot.served.values()]

    # ---- the repository API (explicit mode) -----------------------------------------------------

    async def load(self, name: str) -> None:
        """Load `name`, or bring it up to date with the repository; versions that failed are tried again."""
        self._check_explicit("load")
        if name not in model_names(self.settings.repo):
            raise NotFound(f"no model '{name}' in the repository {self.settings.repo}")
        async with self._lock:
            slot = self.slots.get(name)
            if slot is not None:  # an explicit load retries: the cause may not have been the files (memory, a GPU)
                for status in slot.status.values():
                    status.failed = None
            await self._reconcile_model(name)
            slot = self.slots[name]
        if not slot.served:
            raise LoadFailed(f"failed to load '{name}': {slot.problem}")

    async def unload(self, name: str) -> None:
        """Stop serving `name`: its requests in flight finish first; answered once its versions are stopped."""
        self._check_explicit("unload")
        async with self._lock:
            if name not in self.slots and name not in model_names(self.settings.repo):
                raise NotFound(f"no model '{name}' is loaded or in the repository {self.settings.repo}")
            slot = self.slots.pop(name, None)
            retiring = [self._retire(slot, version, "unloaded") for version in list(slot.served)] if slot else []
        # Outside the lock (other loads need not wait for this drain), and shielded: a caller that gives up (a gRPC
        # deadline) must not cancel the retirement half-way, which would leave the sessions held for good.
        if retiring:
            await asyncio.shield(asyncio.gather(*retiring))

    def _check_explicit(self, action: str) -> None:
        if self.mode != "explicit":
            raise Conflict(f"cannot {action} models through the API: the model control mode is {self.mode} "
                           f"(the repository decides what is served); start vit-serve with --model-control explicit")

    # ---- reconciling with the repository --------------------------------------------------------

    async def reconcile(self) -> None:
        """Bring every wanted model in step with the repository; retire the models no longer wanted."""
        if self._draining():  # the cores belong to the requests being finished
            return
        async with self._lock:
            self.metrics.repository_scans.inc()
            names = self._wanted_names()
            if names is None:
                return
            for name in names:
                await self._reconcile_model(name)
            for name in [n for n in self.slots if n not in names]:
                slot = self.slots.pop(name)
                for version in list(slot.served):
                    self._retire(slot, version, "its model directory is gone")

    def _wanted_names(self) -> list[str] | None:
        """The models to serve, or None (with the reason kept) when the repository cannot be served."""
        repo = self.settings.repo
        available = model_names(repo)
        wanted = (sorted(self._initial if not self.started else self.slots) if self.mode == "explicit"
                  else self.settings.models or available)
        missing = [name for name in wanted if name not in available]
        unknown_pins = [name for name in self.settings.pin_versions if name not in wanted]
        if self.mode != "explicit" and not available:
            self.repository_problem = f"model repository {repo} holds no models; export one with vit-export"
        elif missing and self.mode == "none":
            self.repository_problem = (f"model(s) {', '.join(missing)} not in {repo} "
                                       f"(it holds: {', '.join(available) or 'nothing'})")
        elif unknown_pins and self.mode == "none":
            self.repository_problem = f"pinned version for unknown model(s): {', '.join(sorted(unknown_pins))}"
        else:
            self.repository_problem = None
        self.missing = missing if self.mode != "none" else []
        for name in set(unknown_pins) - self._warned_pins if self.mode != "none" else ():
            log.warning("--pin-versions names %s, which is not served (not in the repository, or not in --models)", name)
            self._warned_pins.add(name)
        if self.repository_problem and self.mode == "none":
            log.error("cannot serve the repository: %s", self.repository_problem)
            return None
        return [name for name in wanted if name in available]

    def _policy(self, name: str) -> VersionPolicy:
        """A pinned version (--pin-versions) first, then the model's own version_policy.json, then --version-policy."""
        if name in self.settings.pin_versions:
            return VersionPolicy("specific", versions=(self.settings.pin_versions[name],))
        return read_version_policy(self.settings.repo, name) or VersionPolicy.parse(self.settings.version_policy)

    async def _reconcile_model(self, name: str) -> None:
        slot = self.slots.setdefault(name, ModelSlot(name, required=not self.started))
        try:
            policy = self._policy(name)
        except InvalidPolicy as error:  # keep serving what it serves; say why nothing changes
            slot.problem = str(error)
            log.error("model %s: %s", name, error)
            return
        repo = self.settings.repo
        on_disk = versions(repo, name)
        for version in [v for v in slot.served if v in on_disk]:  # files replaced in place: load them again
            if fingerprint(repo / name / str(version)) != slot.files[version]:
                await self._load_version(slot, version)
        failed = {v for v in on_disk if (s := slot.status.get(v)) is not None and s.failed is not None
                  and s.failed == fingerprint(repo / name / str(v))}
        while True:  # load the chosen versions, newest first; a failure lets the policy choose among the others
            chosen = policy.select([v for v in on_disk if v not in failed])
            to_load = [v for v in chosen if v not in slot.served]
            if not to_load:
                break
            if not await self._load_version(slot, to_load[0]):
                failed.add(to_load[0])
        keep = [v for v in chosen if v in slot.served]
        if not keep:  # nothing chosen could load: what serves now keeps serving, while its files are there
            keep = [v for v in slot.served if v in on_disk]
        left_aside = f"not chosen by the version policy ({policy.describe()})"
        for version in [v for v in slot.served if v not in keep]:
            self._retire(slot, version, "its directory is gone" if version not in on_disk else left_aside)
        for version in list(slot.status):  # the index tells what is on disk, with today's policy
            status = slot.status[version]
            if version not in on_disk:
                del slot.status[version]
            elif version not in slot.served and status.failed is None and status.state == "UNAVAILABLE":
                status.reason = left_aside
        for version in on_disk:
            slot.status.setdefault(version, VersionStatus("UNAVAILABLE", left_aside))
        slot.problem = None if slot.served else self._why_nothing_serves(slot, policy, on_disk)

    def _why_nothing_serves(self, slot: ModelSlot, policy: VersionPolicy, on_disk: list[int]) -> str:
        if not on_disk:
            return f"{self.settings.repo / slot.name} has no numbered version directories"
        failures = [f"version {v} {slot.status[v].reason}" for v in sorted(on_disk, reverse=True)
                    if v in slot.status and slot.status[v].failed is not None]
        if failures:
            return "; ".join(failures)
        return f"the version policy ({policy.describe()}) chooses none of its versions ({', '.join(map(str, on_disk))})"

    async def _load_version(self, slot: ModelSlot, version: int) -> bool:
        """Load `version` and route to it; one already served (its files changed) is replaced once the new one is
        ready. False when it failed (the reason is kept, the server keeps serving what it served)."""
        name, path = slot.name, self.settings.repo / slot.name / str(version)
        files = fingerprint(path)
        replacing = slot.served.get(version)
        if replacing is None:
            slot.status[version] = VersionStatus("LOADING")
        started = time.perf_counter()
        try:
            served = await self._start(read_version(self.settings.repo, name, version))
        except asyncio.CancelledError:  # shutting down mid-load
            if replacing is None:
                slot.status[version] = VersionStatus("UNAVAILABLE", "loading was cancelled")
            raise
        except Exception as error:  # noqa: BLE001 - any failure is this version's reason, the server keeps serving
            reason = f"failed to load: {str(error) or type(error).__name__}"
            self.metrics.model_loads.labels(name, "failure").inc()
            if replacing is not None:  # the files in place changed and do not load: the loaded copy keeps serving
                slot.files[version] = files  # tried again when they change again
                slot.status[version] = VersionStatus("READY", f"its files changed and {reason}; serving the copy "
                                                              f"loaded before")
            else:
                slot.status[version] = VersionStatus("UNAVAILABLE", reason, failed=files)
            still = f"; still serving version {max(slot.served)}" if slot.served else ""
            log.error("model %s version %d %s%s", name, version, reason, still)
            return False
        self.metrics.model_loads.labels(name, "success").inc()
        self.metrics.model_load_seconds.labels(name).observe(time.perf_counter() - started)
        if replacing is not None:
            self._retire(slot, version, "its files changed: replaced by a fresh load")
        slot.served[version], slot.files[version] = served, files
        slot.status[version] = VersionStatus("READY")
        slot.required = True
        self._show_served(slot)
        loaded = served.loaded
        log.info("serving %s version %d (%s) on %s, variant %s, batch %d, loaded in %.2f s (warm-up %.2f s)", name,
                 version, served.metadata.task, loaded.provider, loaded.variant, served.max_batch_size, served.load_s,
                 loaded.warmup_s)
        return True

    def _retire(self, slot: ModelSlot, version: int, reason: str) -> asyncio.Task:
        """Take `version` out of routing now; stop it in the background once its requests have their answers."""
        served = slot.served.pop(version)
        slot.files.pop(version, None)
        self._leaving[(slot.name, version)] = reason
        slot.status[version] = VersionStatus("UNAVAILABLE", reason)
        self._show_served(slot)
        log.info("model %s version %d leaves service (%s)%s", slot.name, version, reason,
                 f"; serving version {max(slot.served)}" if slot.served else "")

        async def finish() -> None:
            try:
                await self._stop(served)
            finally:
                self._leaving.pop((slot.name, version), None)
                self.metrics.model_unloads.labels(slot.name).inc()
                log.info("model %s version %d unloaded", slot.name, version)

        task = asyncio.create_task(finish(), name=f"retire-{slot.name}-{version}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)
        return task

    def _show_served(self, slot: ModelSlot) -> None:
        """The metrics of what serves: the newest version per model, and one info series per served version."""
        metrics = self.metrics
        if slot.served:
            metrics.served_version.labels(slot.name).set(max(slot.served))
        else:
            with contextlib.suppress(KeyError):
                metrics.served_version.remove(slot.name)
        metrics.show_models(slot.name, list(slot.served.values()))

    # ---- the repository index --------------------------------------------------------------------

    def index(self, ready_only: bool = False) -> list[dict]:
        """Every version in the repository and every version still finishing its requests, with its state and reason
        (Triton's repository index)."""
        repo = self.settings.repo
        leaving = {}
        for (name, version), reason in self._leaving.items():
            leaving.setdefault(name, {})[version] = VersionStatus("UNLOADING", reason)
        rows = []
        for name in sorted(set(model_names(repo)) | set(self.slots) | set(leaving)):
            slot = self.slots.get(name)
            known = {**(slot.status if slot else {}), **leaving.get(name, {})}
            for version in sorted(set(versions(repo, name)) | set(known)):
                if slot is not None and version in slot.served:
                    status = slot.status.get(version) or VersionStatus("READY")
                    if version in leaving.get(name, {}):  # a fresh load of it serves while the old copy finishes
                        status = VersionStatus("READY", status.reason)
                else:
                    status = known.get(version) or VersionStatus("UNAVAILABLE", "unloaded" if slot is None else
                                                                 "not looked at yet: new since the last scan")
                if ready_only and status.state != "READY":
                    continue
                rows.append({"name": name, "version": str(version), "state": status.state, "reason": status.reason})
        return rows
