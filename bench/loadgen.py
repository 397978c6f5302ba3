"""A closed-loop HTTP load generator that should not be the bottleneck.

`LoadGenerator(processes=N)` keeps N worker processes (spawned once, no torch in them). A run of concurrency c spreads
c virtual users over min(N, c) workers; each user holds one keep-alive connection and sends pre-built request bytes
(raw asyncio sockets on uvloop, no HTTP library on the hot path), waiting for each response before the next request.
All workers start together; a run is `warmup_s` unmeasured, then `duration_s` in which every completed response
is counted, then no new requests while the ones in flight finish (so no work spills into the next run).

`trivial_server` answers any request with a fixed 200: running the generator against it measures the generator's
own ceiling, and every run reports the CPU time the generator used, so its share of the machine is known."""
from __future__ import annotations

import asyncio
import http.client
import multiprocessing
import statistics
import time
from dataclasses import dataclass, field

try:
    import uvloop
except ImportError:  # plain asyncio still works, just costs more CPU per request
    uvloop = None

DRAIN_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class HttpRequest:
    """One pre-built request: serialised once, sent many times."""

    path: str
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()  # beyond Host, Content-Type, Content-Length and Connection

    def raw(self, host: str, port: int) -> bytes:
        extra = "".join(f"{name}: {value}\r\n" for name, value in self.headers)
        head = (f"POST {self.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {self.content_type}\r\n"
                f"Content-Length: {len(self.body)}\r\n{extra}Connection: keep-alive\r\n\r\n")
        return head.encode("ascii") + self.body


def multipart_image(path: str, jpeg: bytes, field_name: str = "file") -> HttpRequest:
    boundary = "vitservebench7MA4YWxkTrZu0gW"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field_name}\"; filename=\"image.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode("ascii") + jpeg + f"\r\n--{boundary}--\r\n".encode("ascii")
    return HttpRequest(path, body, f"multipart/form-data; boundary={boundary}")


def request_once(host: str, port: int, request: HttpRequest, timeout: float = 60.0) -> tuple[int, bytes]:
    """Send one request with http.client (checks, not measurements)."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("POST", request.path, request.body, {"Content-Type": request.content_type, **dict(request.headers)})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@dataclass
class LoadResult:
    concurrency: int
    duration_s: float
    latencies_s: list[float] = field(default_factory=list)  # successful responses completed in the window
    errors: dict[str, int] = field(default_factory=dict)  # status code or exception name -> count
    error_latencies_s: dict[str, list[float]] = field(default_factory=dict)  # the same keys: how long each took
    client_cpu_s: float = 0.0  # CPU the generator processes used during the window
    # the Server-Timing metrics (ms, by name) of each successful response that had the header: where the server says
    # the time went
    server_timings: list[dict[str, float]] = field(default_factory=list)

    @property
    def completed(self) -> int:
        return len(self.latencies_s)

    @property
    def per_second(self) -> float:
        return self.completed / self.duration_s

    def percentile_ms(self, q: float) -> float | None:
        if not self.latencies_s:
            return None
        if len(self.latencies_s) == 1:
            return self.latencies_s[0] * 1e3
        return statistics.quantiles(self.latencies_s, n=1000, method="inclusive")[round(q * 1000) - 1] * 1e3

    def summary(self) -> dict:
        return {
            "requests_per_s": self.per_second, "completed": self.completed,
            "p50_ms": self.percentile_ms(0.50), "p99_ms": self.percentile_ms(0.99),
            "errors": dict(self.errors), "client_cpu_cores": self.client_cpu_s / self.duration_s,
            "client_cpu_us_per_request": (self.client_cpu_s / self.completed * 1e6) if self.completed else None,
            "server_timing_p50_ms": {name: statistics.median(t[name] for t in self.server_timings if name in t)
                                     for name in dict.fromkeys(name for t in self.server_timings for name in t)},
        }


@dataclass(frozen=True)
class _RunSpec:
    host: str
    port: int
    requests: list[bytes]
    users: int
    first_user: int
    start_at: float  # time.monotonic(): CLOCK_MONOTONIC on Linux, the same clock in every process
    warmup_s: float
    duration_s: float
    honour_retry_after: bool = False  # a refused user waits the answer's Retry-After before its next request


class LoadGenerator:
    """A pool of generator processes; `run` drives one target at one concurrency and merges their results."""

    def __init__(self, processes: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._pipes, self._workers = [], []
        for _ in range(max(1, processes)):
            parent, child = context.Pipe()
            worker = context.Process(target=_worker_main, args=(child,), daemon=True)
            worker.start()
            self._pipes.append(parent)
            self._workers.append(worker)

    @property
    def processes(self) -> int:
        return len(self._workers)

    def run(self, host: str, port: int, requests: list[HttpRequest], concurrency: int,
            duration_s: float, warmup_s: float, honour_retry_after: bool = False) -> LoadResult:
        raw = [request.raw(host, port) for request in requests]
        used = min(self.processes, concurrency)
        start_at = time.monotonic() + 0.1 + 0.002 * concurrency  # time for every worker to connect its users
        first = 0
        for index in range(used):
            users = concurrency // used + (1 if index < concurrency % used else 0)
            self._pipes[index].send(_RunSpec(host, port, raw, users, first, start_at, warmup_s, duration_s, honour_retry_after))
            first += users
        result = LoadResult(concurrency, duration_s)
        for index in range(used):
            latencies, error_latencies, cpu_s, timings = self._pipes[index].recv()
            result.latencies_s.extend(latencies)
            result.server_timings.extend(timings)
            result.client_cpu_s += cpu_s
            for key, seconds in error_latencies.items():
                result.errors[key] = result.errors.get(key, 0) + len(seconds)
                result.error_latencies_s.setdefault(key, []).extend(seconds)
        return result

    def close(self) -> None:
        for pipe in self._pipes:
            try:
                pipe.send(None)
            except OSError:  # that worker is gone already
                pass
        for worker in self._workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.terminate()

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------------------------------ worker processes

def _worker_main(pipe) -> None:
    while (spec := pipe.recv()) is not None:
        pipe.send(_new_loop_run(_run(spec)))


def _new_loop_run(coroutine):
    if uvloop is not None:
        return uvloop.run(coroutine)
    return asyncio.run(coroutine)


async def _run(spec: _RunSpec) -> tuple[list[float], dict[str, list[float]], float, list[dict[str, float]]]:
    window_start = spec.start_at + spec.warmup_s
    window_end = window_start + spec.duration_s
    latencies: list[float] = []
    errors: dict[str, list[float]] = {}
    timings: list[dict[str, float]] = []
    connections = await asyncio.gather(*(_connect(spec) for _ in range(spec.users)), return_exceptions=True)
    await asyncio.sleep(max(0.0, spec.start_at - time.monotonic()))
    users = [asyncio.ensure_future(_user(spec, spec.first_user + i, conn, window_start, window_end, latencies, errors,
                                         timings))
             for i, conn in enumerate(connections)]
    await asyncio.sleep(max(0.0, window_start - time.monotonic()))
    cpu_start = time.process_time()
    await asyncio.sleep(max(0.0, window_end - time.monotonic()))
    cpu_s = time.process_time() - cpu_start
    done, pending = await asyncio.wait(users, timeout=DRAIN_TIMEOUT_S)
    for task in pending:  # a response that never came: count it, drop the connection
        task.cancel()
        errors.setdefault("drain_timeout", []).append(DRAIN_TIMEOUT_S)
    return latencies, errors, cpu_s, timings


async def _connect(spec: _RunSpec):
    return await asyncio.open_connection(spec.host, spec.port)


async def _user(spec: _RunSpec, index: int, connection, window_start: float, window_end: float,
                latencies: list[float], errors: dict[str, list[float]], timings: list[dict[str, float]]) -> None:
    reader = writer = None
    if not isinstance(connection, BaseException):
        reader, writer = connection
    count = len(spec.requests)
    try:
        while (sent := time.monotonic()) < window_end:
            try:
                if writer is None:
                    reader, writer = await _connect(spec)
                writer.write(spec.requests[index % count])
                status, close, retry_after_s, timing = await _read_response(reader)
            except (OSError, asyncio.IncompleteReadError, ValueError) as error:
                status, close, retry_after_s, timing = type(error).__name__, True, None, None
                await asyncio.sleep(0.01)  # a refused connection must not turn into a busy loop
            done = time.monotonic()
            index += 1
            if window_start <= done <= window_end:
                if status == 200:
                    latencies.append(done - sent)
                    if timing:
                        timings.append(timing)
                else:
                    errors.setdefault(str(status), []).append(done - sent)
            if close and writer is not None:
                writer.close()
                reader = writer = None
            if spec.honour_retry_after and retry_after_s:
                await asyncio.sleep(min(retry_after_s, max(0.0, window_end - time.monotonic())))
    finally:
        if writer is not None:
            writer.close()


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool, float | None, dict[str, float] | None]:
    """Read one HTTP/1.1 response; returns (status, whether the server closes the connection, its Retry-After in
    seconds when it has one, its Server-Timing metrics when it has them)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(None, 2)[1])
    length, chunked, close, retry_after_s, timing = None, False, False, None, None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value
        elif name == b"connection":
            close = value == b"close"
        elif name == b"retry-after" and value.isdigit():
            retry_after_s = float(value)
        elif name == b"server-timing":
            timing = parse_server_timing(value.decode("latin-1"))
    if chunked:
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        await reader.readuntil(b"\r\n")  # no trailers expected
    elif length is not None:
        await reader.readexactly(length)
    else:
        await reader.read()
        close = True
    return status, close, retry_after_s, timing


def parse_server_timing(value: str) -> dict[str, float]:
    """W3C Server-Timing (`name;dur=ms;desc="..."`, comma-separated) -> {name: dur} for the metrics that have a dur."""
    metrics = {}
    for entry in value.split(","):
        name, *params = [part.strip() for part in entry.split(";")]
        durations = [param.split("=", 1)[1] for param in params if param.lower().startswith("dur=")]
        if name and durations:
            metrics[name] = float(durations[0])
    return metrics


# ------------------------------------------------------------------------------------------ the trivial endpoint

TRIVIAL_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"ok\":true}"


def trivial_server(port: int, ready) -> None:
    """Answer every request with a fixed 200 after reading its body: the cheapest server that speaks HTTP/1.1."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                writer.write(TRIVIAL_RESPONSE)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        ready.set()
        async with server:
            await server.serve_forever()

    _new_loop_run(main())


def start_trivial_server(port: int) -> multiprocessing.Process:
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    process = context.Process(target=trivial_server, args=(port, ready), daemon=True)
    process.start()
    if not ready.wait(30):
        process.terminate()
        raise RuntimeError("the trivial server did not start")
    return process
