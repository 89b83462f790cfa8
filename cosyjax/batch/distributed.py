"""Which process this is in a multi-host batch run, and the few points where the processes meet.

A run of ``P`` processes is started like any multi-host JAX program: the same command on every host with
``--coordinator-address HOST:PORT --num-processes P --process-id I`` (or ``JAX_COORDINATOR_ADDRESS``, read by
JAX itself, with ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``), or ``--distributed`` to let
``jax.distributed.initialize()`` detect them (Slurm, Open MPI, Cloud TPU, Kubernetes).  Each process then
drives its own local devices on its share of the work; they meet only twice: after every process has read
the output directory (so they agree on what is left to do) and at the end, when process 0 merges.
"""

from __future__ import annotations

import dataclasses
import os
import secrets

ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """This process's place in the run: ``index`` in [0, ``count``)."""

    index: int
    count: int

    @property
    def is_main(self) -> bool:
        return self.index == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected an integer") from None


def setup(coordinator_address: str | None = None, num_processes: int | None = None,
          process_id: int | None = None, *, auto_detect: bool = False) -> ProcessInfo:
    """Join the multi-process run described by the arguments or the environment (see the module docstring).

    Must run before any JAX computation in the process.  With nothing given it is a one-process run and
    JAX's distributed runtime is not started.  An already initialised runtime is used as it is.

    Raises:
      ValueError: an incomplete or inconsistent description (naming the missing option / variable).
    """
    import jax

    if jax.distributed.is_initialized():
        return ProcessInfo(jax.process_index(), jax.process_count())
    address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    count = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    index = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if auto_detect:
        jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index)
        return ProcessInfo(jax.process_index(), jax.process_count())
    if count is not None and count < 1:
        raise ValueError(f"--num-processes / {ENV_NUM_PROCESSES}: expected >= 1, found {count}")
    if (count or 1) == 1 and index in (None, 0):
        return ProcessInfo(0, 1)
    if count is None:
        raise ValueError(f"process id {index} given without --num-processes / {ENV_NUM_PROCESSES}")
    if index is None or not 0 <= index < count:
        raise ValueError(f"--process-id / {ENV_PROCESS_ID}: expected an integer in [0, {count}), found {index}")
    if not address:
        raise ValueError(f"{count} processes need --coordinator-address / {ENV_COORDINATOR} (host:port of process 0)")
    jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index)
    return ProcessInfo(jax.process_index(), jax.process_count())


def agree_on_run_token(proc: ProcessInfo) -> int:
    """Process 0's random token for this run, on every process; also a barrier (nobody returns early)."""
    token = secrets.randbits(31)
    if proc.count == 1:
        return token
    import numpy as np
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(token), is_source=proc.is_main))
