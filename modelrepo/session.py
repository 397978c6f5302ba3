"""How a repository graph is opened in onnxruntime: one definition of the session options (export checks,
serving and the benchmark all open graphs through it)."""
from __future__ import annotations

import os
from pathlib import Path

import onnxruntime as ort


def usable_cores() -> int:
    """The cores this process may run on (a container's CPU set, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def session_options(intra_op_threads: int, spin_us: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    if spin_us is not None:  # after a run, a spinning thread takes a core from decoding and HTTP until it gives up
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_us else "0")
        options.add_session_config_entry("session.intra_op.spin_duration_us", str(spin_us))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return options


def open_session(path: Path, providers: list[str], intra_op_threads: int | None = None,
                 spin_us: int | None = None) -> ort.InferenceSession:
    """A session on exactly these providers (the caller checks which one really runs); threads default to the usable cores."""
    intra_op_threads = intra_op_threads or usable_cores()
    return ort.InferenceSession(str(path), sess_options=session_options(intra_op_threads, spin_us), providers=providers)
