"""`vit-serve`: load a model repository and serve it with uvicorn (uvloop + httptools).

Every option is also an environment variable `VITSERVE_<NAME>`; see `vit-serve --help`."""
from __future__ import annotations

import signal
import sys

import uvicorn
from pydantic import ValidationError

from .api import create_app
from .http_protocol import ServerConfig
from .logs import configure_logging
from .settings import RetiredSetting, Settings, env_name, load_settings


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT, readiness turns 503 at once; uvicorn then stops accepting, lets admitted requests finish
    (bounded by the drain timeout) and runs the app's shutdown, which drains the batchers."""

    def __init__(self, config: uvicorn.Config, service_state) -> None:
        super().__init__(config)
        self.service_state = service_state

    def handle_exit(self, sig, frame) -> None:
        self.service_state.draining = True
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            # uvicorn re-raises a captured signal after its graceful shutdown, so the process would end "killed by
            # SIGTERM" (143). A drain that finished is a clean exit: status 0, as orchestrators expect.
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]


def serve(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_format)
    # log_config=None: uvicorn's loggers write through our handler (and format), not through handlers of its own;
    # its access log is off because ours (service.middleware) writes one line per request with the request id.
    # No connection cap (uvicorn's limit_concurrency): past it uvicorn answers 503 to every request, health probes
    # included, so a crowd of idle connections would get the pod restarted. Idle and slow connections are bounded
    # in time instead: the header deadline and the keep-alive timeout close them.
    app = create_app(settings)
    app.state.service.settle_collector = True  # this process is the server's own
    config = ServerConfig(app, header_timeout_s=settings.header_timeout_s, max_pace_s=settings.refusal_pause_ms / 1000,
                          refuse_early=app.state.refuse_early,
                          host=settings.host, port=settings.port, loop="uvloop", log_level=settings.log_level,
                          log_config=None, access_log=False, timeout_keep_alive=settings.keep_alive_timeout_s,
                          timeout_graceful_shutdown=settings.drain_timeout_s or None)
    DrainingServer(config, app.state.service).run()


def main(argv: list[str] | None = None) -> int:
    try:
        settings = load_settings(sys.argv[1:] if argv is None else argv)
    except RetiredSetting as error:
        print(f"vit-serve: error: {error}", file=sys.stderr)
        return 2
    except ValidationError as error:
        for item in error.errors():
            print(f"vit-serve: error: {_which_setting(item['loc'])}{item['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    serve(settings)
    return 0


def _which_setting(location: tuple) -> str:
    """`max_batch_size (--max-batch-size, VITSERVE_MAX_BATCH_SIZE): ` for a field's error; nothing for the model's."""
    if not location:
        return ""
    name = str(location[0])
    return f"{'.'.join(map(str, location))} (--{name.replace('_', '-')}, {env_name(name)}): "


if __name__ == "__main__":
    sys.exit(main())
