"""All service options in one place: environment variables `VITSERVE_<NAME>` and the same options on
the command line (`--max-batch-size 16`); the command line wins. Nothing else reads the environment."""
from __future__ import annotations

import argparse
import importlib.util
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, CliSettingsSource, SettingsConfigDict

from modelrepo import VersionPolicy

from .runtimes import Precision, RuntimeName, openvino_installed

Device = Literal["auto", "cpu", "cuda"]
Variant = Literal["auto", "fp32", "int8", "int8-static", "fp16"]
ModelControlMode = Literal["none", "poll", "explicit"]
ENV_PREFIX = "VITSERVE_"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, cli_kebab_case=True, cli_implicit_flags=True, cli_ignore_unknown_args=False,
        env_parse_none_str="null",  # VITSERVE_INTRA_OP_SPIN_US=null asks for the computed default, as --... null does
    )
    # Fields are listed in the order of OPTION_GROUPS below, which is the order of `vit-serve --help`. A field whose
    # default is None or computed says in its description what that means ("default: ..."): the help prints it.

    repo: Path = Field(description="model repository written by vit-export")
    models: list[str] = Field(default_factory=list, description="model names to load (default: all in the repository)")
    pin_versions: dict[str, int] = Field(default_factory=dict, description='pinned versions, e.g. {"demo-classifier": 1} '
                                         "(default: the latest version of each model)")
    model_control: ModelControlMode = Field("none", description="none: read the repository once, at start; poll: "
                                            "rescan it every --repository-poll-s and serve new versions without a "
                                            "restart; explicit: only the repository API loads and unloads models "
                                            "(POST /v2/repository/models/NAME/load|unload; --models are loaded at start)")
    repository_poll_s: float = Field(5.0, gt=0, description="poll mode: seconds between two scans of the repository")
    version_policy: str = Field("latest", description="versions served of a model without its own version_policy.json: "
                                "latest (the newest), latest:N (the N newest), all, or specific:V1,V2,...")
    variant: Variant = Field("auto", description="graph variant: auto = fp16 on CUDA when exported, else fp32")
    device: Device = Field("auto", description="auto: CUDA when it really loads, else CPU (with a warning); cuda: fail without it")
    runtime: RuntimeName = Field("onnxruntime", description="what runs the graphs: onnxruntime (CPU or CUDA), or openvino (CPU "
                             "only; needs the openvino extra: pip install 'vitserve[openvino]'); both read the same files")
    precision: Precision = Field("auto", description="compute precision of the float operations: f32, or bf16 (OpenVINO "
                                 "on a CPU with AVX512_BF16 or AMX); auto: bf16 where OpenVINO has it, else f32")

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on")
    grpc_port: int | None = Field(None, ge=1, le=65535, description="port for the Open Inference Protocol over gRPC "
                                  "(KServe V2 / Triton, whose gRPC port is 8001); 0 or empty: off. Off by default "
                                  "because it needs the grpc extra (pip install 'vitserve[grpc]') and opens a second "
                                  "port; the container images turn it on at 8001 (default: off)")
    api_key: SecretStr | None = Field(None, description="when set, requests need 'Authorization: Bearer <key>' or 'X-API-Key'; "
                                      "probes and metrics stay open (default: none, no key needed)")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long queued and running work may take, in seconds")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection must send a request's complete headers within "
                                    "this many seconds of opening (or of the request's first byte); else it is closed")
    refusal_pause_ms: float = Field(1000.0, ge=0, description="after a 503 with Retry-After, the connection is not "
                                    "read again for this long, or Retry-After if shorter: clients that retry at once "
                                    "cannot make refusing all the server does; 0: no pause (behind a proxy that pools its connections)")
    keep_alive_timeout_s: int = Field(5, ge=1, description="an idle kept-alive connection is closed after this many "
                                      "seconds; behind a load balancer, make it longer than the balancer's idle timeout")

    timeout_ms: int = Field(30_000, ge=1, description="default per-request deadline (a request may ask for less)")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1, description="largest request body; larger ones get 413 "
                                "(and the largest gRPC message: RESOURCE_EXHAUSTED)")
    max_images_per_request: int = Field(32, ge=1, description="more images in one request get 413; must not exceed "
                                        "--max-queue-images")
    max_pixels: int = Field(40_000_000, ge=1, description="per image, checked before decoding")

    max_batch_size: int | None = Field(None, ge=1, description="images per batch (default: 64 on CUDA; on CPU the "
                                       "smallest of 1, 2, 4, 8 with the best time per image, timed at start)")
    max_delay_ms: float = Field(2.0, ge=0, description="longest wait to fill a batch, only while the model is busy anyway")
    max_queue_images: int = Field(256, ge=1, description="queued images per model before requests are refused with 503")
    max_queue_delay_ms: float | Literal["auto"] | None = Field(
        "auto", description="a request that would find more than this much work queued ahead of it (estimated from "
        "recent batch times) is refused at once with 503. auto: the time to run 16 images per instance, at least "
        "1000 ms (it follows the model's speed); null: no time bound. Whatever this says, a request that would not start "
        "before its own deadline is refused too")
    instances: int | None = Field(None, ge=1, description="batches of one model that run at once, each in its own thread "
                                  "(default: 1 on CUDA, 2 on a multi-core CPU, else 1: see the README's benchmarks)")

    intra_op_threads: int | None = Field(None, ge=1, description="onnxruntime threads per running batch (default: CPU cores / instances)")
    solo_all_cores: bool = Field(True, description="CPU with instances > 1: a batch that runs alone uses every core, through a "
                                 "second session of the model (lowest latency for a lone request; the weights are held twice)")
    # 100 us: onnxruntime's default spin kept a thread busy for milliseconds after every run, on a core that decoding
    # and HTTP needed (ViT-Tiny, 2 cores, c=1: p99 23 -> 16 ms, paired; throughput unchanged).
    intra_op_spin_us: int | None = Field(100, ge=0, description="how long an idle onnxruntime thread busy-waits for work "
                                         "before it sleeps, in microseconds; 0: never; null: onnxruntime's default")
    decode_threads: int | None = Field(None, ge=1, description="image decoding threads (default: half the CPU cores, at least "
                                       "1); a lone request's one small image is decoded on the event loop instead")

    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="least severe log level written")
    log_format: Literal["text", "json"] = Field("text", description="text: lines for a terminal; json: one JSON object per "
                                                "line, access lines included, for log collectors")

    @field_validator("repo", mode="before")
    @classmethod
    def _an_empty_repo_is_a_mistake(cls, repo: object) -> object:
        if isinstance(repo, str) and not repo.strip():  # Path("") would quietly serve the current directory
            raise ValueError("the model repository is set but empty")
        return repo

    @field_validator("repo")
    @classmethod
    def _repo_must_be_a_directory(cls, repo: Path) -> Path:
        if not repo.is_dir():
            raise ValueError(f"model repository {repo} is not a directory (create one with vit-export)")
        return repo

    @field_validator("version_policy")
    @classmethod
    def _policy_must_parse(cls, policy: str) -> str:
        VersionPolicy.parse(policy)  # InvalidPolicy is a ValueError: reported like any bad setting
        return policy

    @field_validator("grpc_port", mode="before")
    @classmethod
    def _zero_or_empty_is_off(cls, port: object) -> object:
        return None if isinstance(port, (int, str)) and str(port).strip() in ("", "0") else port

    @field_validator("grpc_port")
    @classmethod
    def _grpc_needs_its_extra(cls, port: int | None) -> int | None:
        if port is not None and any(importlib.util.find_spec(name) is None for name in ("grpc", "google.protobuf")):
            raise ValueError("serving gRPC needs the grpc extra (grpcio, protobuf), which is not installed: "
                             "pip install 'vitserve[grpc]', or leave the gRPC port unset")
        return port

    @field_validator("api_key")
    @classmethod
    def _an_empty_key_is_a_mistake(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and not key.get_secret_value().strip():
            raise ValueError("VITSERVE_API_KEY is set but empty; unset it to serve without a key")
        return key

    @field_validator("runtime")
    @classmethod
    def _openvino_needs_its_extra(cls, runtime: str) -> str:
        if runtime == "openvino" and not openvino_installed():
            raise ValueError("the openvino runtime needs the openvino extra, which is not installed: "
                             "pip install 'vitserve[openvino]', or use --runtime onnxruntime")
        return runtime

    @field_validator("max_queue_delay_ms")
    @classmethod
    def _a_time_bound_is_not_negative(cls, value):
        if isinstance(value, float) and value < 0:
            raise ValueError("must be >= 0, auto or null")
        return value

    @model_validator(mode="after")
    def _runtime_device_and_precision_agree(self) -> "Settings":
        if self.runtime == "openvino" and self.device == "cuda":
            raise ValueError("the openvino runtime serves on the CPU; use --device cpu or auto, or --runtime onnxruntime for CUDA")
        if self.runtime == "onnxruntime" and self.precision == "bf16":
            raise ValueError("onnxruntime has no bf16 CPU kernels: precision bf16 needs --runtime openvino")
        return self

    @model_validator(mode="after")
    def _one_port_per_protocol(self) -> "Settings":
        if self.grpc_port is not None and self.grpc_port == self.port:
            raise ValueError(f"the gRPC port and the HTTP port are both {self.port}; give each its own")
        return self

    @model_validator(mode="after")
    def _a_request_must_fit_the_queue(self) -> "Settings":
        if self.max_images_per_request > self.max_queue_images:
            raise ValueError(f"max_images_per_request ({self.max_images_per_request}) must not exceed max_queue_images "
                             f"({self.max_queue_images}): such a request could never be queued")
        return self

    def instances_for(self, provider: str) -> int:
        # Two on a multi-core CPU: ViT-Tiny on 2 cores, c=16: 0.99 -> 1.13x the throughput of one all-cores instance
        # (bench/README.md); a lone batch still gets every core through the solo session.
        if self.instances:
            return self.instances
        return 1 if provider == "CUDAExecutionProvider" or self.cores < 2 else 2

    def intra_op_threads_for(self, instances: int) -> int:
        return self.intra_op_threads or max(1, self.cores // instances)

    def solo_threads_for(self, instances: int) -> int:
        """Threads of the session a lone batch runs on: every instance's threads (the cores, unless set)."""
        return self.intra_op_threads * instances if self.intra_op_threads else self.cores

    def batch_size_for(self, provider: str) -> int | None:
        """The configured batch size; None on a CPU when unset: the service times it at start (efficient_batch_size)."""
        return self.max_batch_size or (64 if provider == "CUDAExecutionProvider" else None)

    @property
    def cores(self) -> int:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)



# The sections of `vit-serve --help`, in order; every field is in exactly one.
OPTION_GROUPS: dict[str, tuple[str, ...]] = {
    "model repository": ("repo", "models", "pin_versions", "model_control", "repository_poll_s", "version_policy",
                         "variant", "device", "runtime", "precision"),
    "server": ("host", "port", "grpc_port", "api_key", "drain_timeout_s", "header_timeout_s", "keep_alive_timeout_s",
               "refusal_pause_ms"),
    "request limits": ("timeout_ms", "max_body_bytes", "max_images_per_request", "max_pixels"),
    "batching": ("max_batch_size", "max_delay_ms", "max_queue_images", "max_queue_delay_ms", "instances"),
    "CPU threads": ("intra_op_threads", "solo_all_cores", "intra_op_spin_us", "decode_threads"),
    "logging": ("log_level", "log_format"),
}

# How a value is written on the command line, in words for people rather than Python's type names.
_VALUE_WORDS = {Path: "PATH", str: "TEXT", int: "N", float: "NUMBER", SecretStr: "SECRET"}

_DESCRIPTION = """\
Serve the models of a model repository (written by vit-export) over HTTP,
and over gRPC with --grpc-port.

Every option is also an environment variable, VITSERVE_<OPTION>, e.g.
VITSERVE_MAX_BATCH_SIZE=16; the command line wins. Lists take commas or JSON
(--models a,b), maps take JSON (--pin-versions '{"demo-classifier": 1}'), and
an option whose default is computed takes null to ask for that default."""

_EXAMPLES = """\
examples:
  vit-serve --repo models
  vit-serve --repo models --port 9000 --device cpu --log-format json
  VITSERVE_MAX_BATCH_SIZE=16 vit-serve --repo models"""


def env_name(field_name: str) -> str:
    return f"{ENV_PREFIX}{field_name.upper()}"


def value_word(annotation: object) -> str:
    """`int | None` -> N, `Literal["a", "b"]` -> {a,b}, `list[str]` -> TEXT,... : what `--help` shows after an option."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):  # an optional value: None is the unset default, not a choice
        return "|".join(value_word(a) for a in args if a is not type(None))
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin is list:
        return f"{value_word(args[0])},..."
    if origin is dict:
        return "JSON"
    return _VALUE_WORDS.get(annotation, getattr(annotation, "__name__", str(annotation)).upper())


def option_help(name: str, field: FieldInfo) -> str:
    """The description, the default when it is a plain value (a computed one is told by the description), the
    environment variable."""
    text = field.description
    if field.is_required():
        text += " (required)"
    elif field.default_factory is None and field.default is not None:
        default = field.default
        shown = ("on" if default else "off") if isinstance(default, bool) else f"{default:g}" if isinstance(default, float) else default
        text += f" (default: {shown})"
    return f"{text}\nenv: {env_name(name)}".replace("%", "%%")  # argparse formats help with %


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps each line of an option's help on its own, so the environment variable keeps a line to itself."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        wrap = super()._split_lines  # (zero-argument super() does not work inside a comprehension)
        return [wrapped for line in text.splitlines() for wrapped in wrap(line, width)]


def command_line_parser() -> tuple[argparse.ArgumentParser, Callable[..., argparse.Action]]:
    """The `vit-serve` parser, grouped by OPTION_GROUPS, and the hook pydantic-settings adds each option through."""
    parser = argparse.ArgumentParser(prog="vit-serve", description=_DESCRIPTION, epilog=_EXAMPLES,
                                     formatter_class=_HelpFormatter)
    groups = {title: parser.add_argument_group(title) for title in OPTION_GROUPS}
    group_of = {name: groups[title] for title, names in OPTION_GROUPS.items() for name in names}

    def add_option(_parser, *flags: str, **kwargs):
        name = kwargs["dest"]
        if name not in group_of:
            raise LookupError(f"setting {name!r} is in no OPTION_GROUPS section of service/settings.py")
        field = Settings.model_fields[name]
        kwargs["help"] = option_help(name, field)
        if "metavar" in kwargs:  # flags (--solo-all-cores / --no-solo-all-cores) take no value
            kwargs["metavar"] = value_word(field.annotation)
        return group_of[name].add_argument(*flags, **kwargs)

    return parser, add_option


class RetiredSetting(ValueError):
    """A setting that was removed is still given."""


# Settings that no longer exist, with what to do instead: refused rather than silently ignored.
RETIRED = {
    "workers": "vit-serve runs one server process; scale with replicas (one process per pod or container), and "
               "use --instances for batches that run side by side inside it",
}


def load_settings(argv: list[str] | None = None) -> Settings:
    """Settings from the environment, overridden by command-line options when `argv` is given."""
    for name, instead in RETIRED.items():
        if env_name(name) in os.environ or f"--{name.replace('_', '-')}" in (argv or []):
            raise RetiredSetting(f"{name} (--{name.replace('_', '-')}, {env_name(name)}) was removed: {instead}")
    if argv is None:
        return Settings()
    parser, add_option = command_line_parser()
    source = CliSettingsSource(Settings, root_parser=parser, add_argument_method=add_option)
    return Settings(_cli_settings_source=source(args=argv))
