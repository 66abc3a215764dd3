"""Multi-process (multi-host) start-up: `jax.distributed.initialize` from a config or the usual environment.

Call it first, before anything touches a JAX device. Every process then runs the same program: it builds the
same global mesh (`make_mesh` uses `jax.devices()`, all processes' devices), and `from_pretrained(..., mesh=)`
reads and places only the slices its own devices hold. Results that are sharded over other processes' devices
are read back with `jax.experimental.multihost_utils.process_allgather` (`generate` returns replicated ones).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax

ENV = {  # option -> environment variables, first set wins (GPTOSS_* first, then JAX's own names)
    "coordinator_address": ("GPTOSS_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("GPTOSS_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("GPTOSS_PROCESS_ID", "JAX_PROCESS_ID"),
    "local_device_ids": ("GPTOSS_LOCAL_DEVICE_IDS", "JAX_LOCAL_DEVICE_IDS"),
}
OPTIONS = (*ENV, "initialization_timeout", "cluster_detection_method")


def distributed_options(config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> dict:
    """The initialize() keyword arguments from `config` (wins) and the environment."""
    environ = os.environ if environ is None else environ
    config = dict(config or {})
    unknown = sorted(set(config) - set(OPTIONS))
    if unknown:
        raise ValueError(f"distributed: unknown option {unknown[0]!r}; known: {list(OPTIONS)}")
    opts = {}
    for key, names in ENV.items():
        value = config.get(key)
        if value is None:
            value = next((environ[n] for n in names if environ.get(n)), None)
        if value is None:
            continue
        if key in ("num_processes", "process_id"):
            value = int(value)
        elif key == "local_device_ids" and isinstance(value, str):
            value = [int(v) for v in value.split(",") if v.strip()]
        opts[key] = value
    for key in ("initialization_timeout", "cluster_detection_method"):
        if config.get(key) is not None:
            opts[key] = config[key]
    return opts


def init_distributed(config: Mapping[str, Any] | None = None, *, auto: bool = False, **kwargs) -> bool:
    """Starts multi-process JAX when configured; returns whether this is a multi-process run.

    Options (config dict or keywords; else GPTOSS_* / JAX_* environment variables): coordinator_address
    ("host:port" of process 0), num_processes, process_id, local_device_ids. With none of them set this is
    a no-op (single process) unless `auto=True`, which lets JAX detect a cluster (SLURM, Open MPI, TPU pods).
    Calling it again after a successful start is a no-op. On CPUs the collectives go through gloo.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    opts = distributed_options({**dict(config or {}), **kwargs})
    if not opts and not auto:
        return False
    if "coordinator_address" in opts and ("num_processes" not in opts or "process_id" not in opts):
        missing = [k for k in ("num_processes", "process_id") if k not in opts]
        raise ValueError(f"distributed: coordinator_address is set but {missing} are not "
                         f"(set them, or the environment variables {[ENV[k][1] for k in missing]})")
    jax.distributed.initialize(**opts)
    return jax.process_count() > 1
