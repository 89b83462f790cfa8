"""Compiled stage programs, keyed by their static arguments and input shapes.

``jax.jit`` compiles a function the first time it sees new shapes, inside whatever call brought
them: for a server that is inside a request.  ``ProgramCache`` makes the compiled programs explicit
objects: ``cache(fn, *args, **static)`` runs ``fn`` (a ``jax.jit``-wrapped stage core) through an
executable compiled ahead of time for those static arguments and argument shapes, compiling it on
first use, and ``cache.compile(fn, *specs, **static)`` compiles one from shapes alone
(``jax.ShapeDtypeStruct``), without running anything.  ``CosyVoice3Model.warmup`` compiles every
program the documented limits can reach; after it, a request inside the limits compiles nothing.

The same (fn, shapes, static) triples are what ``jax.export`` needs, so ``ProgramCache.specs`` also
lists them for ``cosyjax export-programs``.

A cache belongs to one device: the key holds shapes and static arguments, not where the arguments live,
and an executable runs only on the device it was compiled for (a model copy on another device gets a
cache of its own, as ``cosyjax.batch`` does).

Thread safety: lookups and inserts take a lock; two threads compiling the same program at once
compile it twice and keep one (harmless, and only before warm-up).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any, Callable

import jax
import numpy as np


def _spec(x: Any) -> Any:
    """The ``ShapeDtypeStruct`` of an argument leaf (arrays, numpy, specs; Python scalars as weak types)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, (bool, int, float)) and not isinstance(x, np.generic):
        return jax.ShapeDtypeStruct((), jax.numpy.asarray(x).dtype, weak_type=True)
    arr = x if isinstance(x, jax.Array) else np.asarray(x)
    return jax.ShapeDtypeStruct(arr.shape, arr.dtype, weak_type=getattr(x, "weak_type", False))


def program_key(fn: Callable, args: tuple, static: dict) -> tuple:
    """What identifies a program: the function, its static arguments and the argument shapes/dtypes."""
    leaves, tree = jax.tree.flatten(args)
    return (fn, tuple(sorted(static.items(), key=lambda kv: kv[0])), tree, tuple(map(_leaf_key, leaves)))


def _leaf_key(x: Any) -> tuple:
    # Arrays and specs directly: building a ShapeDtypeStruct per leaf was ~7 % of a tiny-model request
    # (the weights are hundreds of leaves, keyed on every call).
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
        return x.shape, x.dtype, bool(getattr(x, "weak_type", False))
    s = _spec(x)
    return s.shape, s.dtype, bool(s.weak_type)


@dataclasses.dataclass
class Program:
    """One compiled stage program and what it was compiled for."""

    name: str
    fn: Callable
    specs: tuple
    static: dict
    executable: Any
    seconds: float


class ProgramCache:
    """Compiled programs by (function, static arguments, argument shapes); see the module docstring.

    Attributes:
      compiles: programs compiled so far (by ``compile`` or on a first call).
      seconds: total compile time.
    """

    def __init__(self):
        self._programs: dict[tuple, Program] = {}
        self._lock = threading.Lock()
        self.compiles = 0
        self.seconds = 0.0

    def __len__(self) -> int:
        return len(self._programs)

    def compile(self, fn: Callable, *args: Any, **static: Any) -> Program:
        """The program for ``fn(*args, **static)``, compiled now if it is new; ``args`` may be specs."""
        key = program_key(fn, args, static)
        with self._lock:
            found = self._programs.get(key)
        if found is not None:
            return found
        specs = jax.tree.map(_spec, args)
        start = time.perf_counter()
        executable = fn.lower(*specs, **static).compile()
        seconds = time.perf_counter() - start
        program = Program(getattr(fn, "__name__", repr(fn)), fn, specs, dict(static), executable, seconds)
        with self._lock:
            if key not in self._programs:
                self._programs[key] = program
                self.compiles += 1
                self.seconds += seconds
            return self._programs[key]

    def __call__(self, fn: Callable, *args: Any, **static: Any) -> Any:
        """Run ``fn(*args, **static)`` through its compiled program."""
        return self.compile(fn, *args, **static).executable(*args)

    def programs(self) -> list[Program]:
        with self._lock:
            return list(self._programs.values())


class CompileCounter:
    """Counts the executables jax builds while the block runs (``jax.monitoring`` events): XLA backend
    compiles and loads from the persistent compilation cache (a load replaces a compile).  How the
    "nothing compiles after warm-up" claim is checked::

        with CompileCounter() as counter:
            ...
        counter.count, counter.seconds

    The one definition of a compile in cosyjax (``benchmarks.common.compile_record`` builds on it): each
    ``/jax/core/compile/backend_compile_duration`` event is one executable.  jax records that event around
    ``compile_or_get_cached``, so a persistent-cache load records it too, with its
    ``/jax/compilation_cache/cache_retrieval_time_sec`` inside; the load is counted once, through the
    former, and also tallied in ``cache_loads``.

    Attributes:
      count: executables built (backend compiles + persistent-cache loads).
      seconds: their backend seconds (compile, or cache read).
      cache_loads: how many of ``count`` were persistent-cache loads.
      trace_seconds: seconds tracing Python to jaxprs (``jaxpr_trace_duration``).
      lower_seconds: seconds lowering jaxprs to MLIR (``jaxpr_to_mlir_module_duration``).
      total_seconds: trace + lower + backend seconds (property).
    Events on any thread count while the block runs (a server's engine thread compiles too).
    """

    COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # one per executable built or loaded
    CACHE_LOAD_EVENT = "/jax/compilation_cache/cache_retrieval_time_sec"
    TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
    LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"

    def __init__(self):
        self.count = 0
        self.seconds = 0.0
        self.cache_loads = 0
        self.trace_seconds = 0.0
        self.lower_seconds = 0.0
        self._lock = threading.Lock()

    @property
    def total_seconds(self) -> float:
        """Trace + lower + backend seconds: all the compile-time jax spent in the block."""
        return self.trace_seconds + self.lower_seconds + self.seconds

    def _listener(self, name: str, duration: float, **kwargs: Any) -> None:
        with self._lock:
            if name == self.COMPILE_EVENT:
                self.count += 1
                self.seconds += duration
            elif name == self.CACHE_LOAD_EVENT:
                self.cache_loads += 1
            elif name == self.TRACE_EVENT:
                self.trace_seconds += duration
            elif name == self.LOWER_EVENT:
                self.lower_seconds += duration

    def __enter__(self) -> "CompileCounter":
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc: Any) -> None:
        jax.monitoring.unregister_event_duration_listener(self._listener)


def exportable(cls: type) -> type:
    """Class decorator: let ``jax.export`` serialise programs whose inputs or outputs hold ``cls``, a
    pytree dataclass without static (auxiliary) fields (its empty aux data round-trips as b"")."""
    jax.export.register_pytree_node_serialization(
        cls, serialized_name=f"{cls.__module__}.{cls.__qualname__}", serialize_auxdata=lambda aux: b"",
        deserialize_auxdata=lambda data: ())
    return cls


def run(cache: ProgramCache | None, fn: Callable, *args: Any, **static: Any) -> Any:
    """``cache(fn, *args, **static)``, or the plain jitted call without a cache."""
    if cache is None:
        return fn(*args, **static)
    return cache(fn, *args, **static)


def specs_of(tree: Any) -> Any:
    """A pytree of ``ShapeDtypeStruct`` with the shapes and dtypes of ``tree``'s leaves."""
    return jax.tree.map(_spec, tree)


__all__ = ["CompileCounter", "Program", "ProgramCache", "exportable", "program_key", "run", "specs_of"]
