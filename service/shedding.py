"""Refusing a request before its body is read, at the connection (called by `service.http_protocol` once a request's
headers are in, before any ASGI task exists for it).

Under overload most requests are refused, and each refusal costs the event loop time that the admitted requests
need. Through the app (an ASGI task, the middleware chain, routing) a refusal took about 100 us of the loop; here it
is a dictionary lookup, the model's admission check and a response written to the socket. It is still counted,
logged and given its request id, as every request is. Only requests whose model is known from the URL (a task route's
only model or its `model=` parameter; a V2 infer path) and that the model would refuse even as a single image with
the server's longest deadline are refused here; everything else goes on to the app, which decides with the
request's own parameters."""
from __future__ import annotations

import json
import re
import time
from urllib.parse import parse_qs

from .errors import Overloaded, ServiceError
from .inference import request_deadline
from .metrics import Metrics
from .middleware import api_key_given, key_matches, observe_request, request_id_from
from .state import ServedModel, ServiceState
from .v2.errors import error_body_for, is_v2_path, v2_status
from .v2.infer import served_model

_V2_INFER = re.compile(r"^/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer$")
_V2_INFER_ROUTES = ("/v2/models/{model_name}/infer", "/v2/models/{model_name}/versions/{model_version}/infer")


class EarlyRefusals:
    def __init__(self, state: ServiceState, metrics: Metrics, *, tasks: list[str], api_key: str | None) -> None:
        self.state, self.metrics = state, metrics
        self.task_paths = {f"/{task}": task for task in tasks}
        self.api_key = None if api_key is None else api_key.encode()

    def __call__(self, path: str, query: bytes, headers: list[tuple[bytes, bytes]],
                 client: str) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        """The response (status, headers, body) that refuses this POST now, or None to let the app decide."""
        started = time.perf_counter()
        arrived = time.monotonic()
        try:
            found = self._model_named_by_url(path, query)
            if found is None:
                return None
            route, model = found
            model.batcher.check_capacity(1, request_deadline(self.state, None, arrived=arrived))
        except Overloaded as refusal:
            named = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in headers}
            if self.api_key is not None and not key_matches(api_key_given(named), self.api_key):
                return None  # the app answers 401 and says why
            return self._answer(refusal, path, route, named, client, started)
        except ServiceError:
            return None  # an unknown model or shutting down: the app answers as without overload
        return None

    def _model_named_by_url(self, path: str, query: bytes) -> tuple[str, ServedModel] | None:
        """The route template and the served model, when the URL alone names it; else None (the body may)."""
        task = self.task_paths.get(path)
        if task is not None:
            params = parse_qs(query.decode("latin-1"), keep_blank_values=True)
            names = params.get("model", [])
            if "version" in params or len(names) > 1 or names == [""]:
                return None  # the app answers these (a version may be idle while the newest is busy; bad parameters)
            if not names and sum(m.metadata.task == task for m in self.state.models.values()) != 1:
                return None  # the body may name the model
            model = self.state.model_for(task, names[0] if names else None)
            # with several versions served, the body may ask for one that is idle while the newest is busy
            return None if len(self.state.control.served_versions(model.name)) > 1 else (path, model)
        v2 = _V2_INFER.match(path)
        if v2 is not None:
            name, version = v2["name"], v2["version"]
            return _V2_INFER_ROUTES[version is not None], served_model(self.state, name, version)
        return None

    def _answer(self, refusal: Overloaded, path: str, route: str, headers: dict[str, str], client: str,
                started: float) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        request_id = request_id_from(headers.get("x-request-id", ""))
        body = json.dumps(error_body_for(path, refusal)).encode()
        status = v2_status(refusal) if is_v2_path(path) else refusal.status
        response_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *((name.lower().encode(), value.encode()) for name, value in refusal.headers.items()),
                            (b"x-request-id", request_id.encode())]
        observe_request(self.metrics, request_id, "POST", route, path, status, time.perf_counter() - started, client)
        return status, response_headers, body
