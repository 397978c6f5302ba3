"""All service options in one place: environment variables `VITSERVE_<NAME>` and the same options on
the command line (`--max-batch-size 16`); the command line wins. Nothing else reads the environment."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Device = Literal["auto", "cpu", "cuda"]
Variant = Literal["auto", "fp32", "int8", "fp16"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="VITSERVE_", cli_kebab_case=True, cli_prog_name="vit-serve", cli_implicit_flags=True,
        cli_ignore_unknown_args=False,
    )

    repo: Path = Field(description="model repository written by vit-export")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535)
    device: Device = Field("auto", description="auto: CUDA when it really loads, else CPU (with a warning); cuda: fail without it")
    workers: int = Field(1, ge=1, description="server processes (each loads every model)")
    variant: Variant = Field("auto", description="graph variant: auto = fp16 on CUDA when exported, else fp32")
    models: list[str] = Field(default_factory=list, description="model names to load (default: all in the repository)")
    pin_versions: dict[str, int] = Field(default_factory=dict, description='pinned versions, e.g. {"demo-classifier": 1} (default: latest)')
    max_batch_size: int | None = Field(None, ge=1, description="images per batch (default: 64 on CUDA; on CPU the "
                                       "smallest of 1, 2, 4, 8 with the best time per image, timed at start)")
    max_delay_ms: float = Field(2.0, ge=0, description="longest wait to fill a batch, only while the model is busy anyway")
    max_queue_images: int = Field(256, ge=1, description="queued images per model before requests are refused with 503")
    timeout_ms: int = Field(30_000, ge=1, description="default per-request deadline (a request may ask for less)")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1)
    max_images_per_request: int = Field(32, ge=1)
    max_pixels: int = Field(40_000_000, ge=1, description="per image, checked before decoding")
    instances: int | None = Field(None, ge=1, description="batches of one model that run at once, each in its own thread "
                                  "(default: 1 on CUDA, 2 on a multi-core CPU, else 1: see the README's benchmarks)")
    intra_op_threads: int | None = Field(None, ge=1, description="onnxruntime threads per running batch (default: CPU cores / instances)")
    solo_all_cores: bool = Field(True, description="CPU with instances > 1: a batch that runs alone uses every core, through a "
                                 "second session of the model (lowest latency for a lone request; the weights are held twice)")
    # 100 us: onnxruntime's default spin kept a thread busy for milliseconds after every run, on a core that decoding
    # and HTTP needed (ViT-Tiny, 2 cores, c=1: p99 23 -> 16 ms, paired; throughput unchanged).
    intra_op_spin_us: int | None = Field(100, ge=0, description="how long an idle onnxruntime thread busy-waits for work "
                                         "before it sleeps, in microseconds; 0: never; unset (null): onnxruntime's default")
    decode_threads: int | None = Field(None, ge=1, description="image decoding threads (default: half the CPU cores, at least 1)")
    drain_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, how long queued and running work may take")
    api_key: SecretStr | None = Field(None, description="when set, requests need 'Authorization: Bearer <key>' or 'X-API-Key'")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("repo")
    @classmethod
    def _repo_must_be_a_directory(cls, repo: Path) -> Path:
        if not repo.is_dir():
            raise ValueError(f"model repository {repo} is not a directory (create one with vit-export)")
        return repo

    @field_validator("api_key")
    @classmethod
    def _an_empty_key_is_a_mistake(cls, key: SecretStr | None) -> SecretStr | None:
        if key is not None and not key.get_secret_value().strip():
            raise ValueError("VITSERVE_API_KEY is set but empty; unset it to serve without a key")
        return key

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


def load_settings(argv: list[str] | None = None) -> Settings:
    """Settings from the environment, overridden by command-line options when `argv` is given."""
    if argv is None:
        return Settings()
    return Settings(_cli_parse_args=argv)
