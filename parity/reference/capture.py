"""Capturing what upstream computes: golden arrays, forward hooks, the torch reference mode, and
taps that force and record the random draws of upstream's training forwards.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import numpy as np

from cosyjax.parity.reference.config import MakeCaseError


class Arrays:
    """Ordered golden arrays plus their manifest entries."""

    def __init__(self) -> None:
        self.arrays: dict[str, np.ndarray] = {}
        self.desc: dict[str, str] = {}

    def put(self, key: str, value: Any, desc: str) -> None:
        import torch

        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        a = np.asarray(value)
        if a.dtype == np.bool_:
            a = a.astype(np.bool_)
        elif a.dtype.kind == "f":
            a = a.astype(np.float32)
        elif a.dtype.kind in "iu":
            a = a.astype(np.int64)
        else:
            raise MakeCaseError(f"{key}: unexpected dtype {a.dtype}")
        if key in self.arrays:
            raise MakeCaseError(f"{key}: captured twice")
        self.arrays[key] = np.array(a, order="C", copy=True)  # (ascontiguousarray would make 0-d 1-d)
        self.desc[key] = desc

    def manifest(self) -> dict[str, Any]:
        return {k: {"shape": list(a.shape), "dtype": str(a.dtype), "desc": self.desc[k]}
                for k, a in self.arrays.items()}


@contextlib.contextmanager
def hook(module: Any, fn: Callable, with_kwargs: bool = False) -> Iterator[None]:
    """A forward hook ``fn`` on ``module`` for the duration of the block."""
    handle = module.register_forward_hook(fn, with_kwargs=with_kwargs)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def torch_reference_mode() -> Iterator[None]:
    """One torch thread and deterministic algorithms (restored afterwards)."""
    import torch

    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


class RandomTap:
    """Stands in for the ``random`` module inside one upstream module and records every draw.

    Record mode: ``random()`` returns the next forced value of ``script`` and ``randint(a, b)``
    returns ``a + round(f * (b - a))`` for the next forced fraction f of ``fractions`` (cycling);
    running out of forced ``random()`` values is an error, so every draw upstream makes is one we
    chose and recorded.  Replay mode (``replay`` = another tap's ``calls``): returns the recorded
    values in order and fails if upstream calls anything else.  Any other attribute of ``random``
    fails loudly.
    """

    def __init__(self, script=(), fractions=(1.0,), replay=None):
        self._script = list(script)
        self._fractions = list(fractions)
        self._replay = None if replay is None else list(replay)
        self._randint_calls = 0
        self.calls: list[tuple[str, tuple, Any]] = []

    def _next(self, name: str, args: tuple) -> Any:
        if self._replay is not None:
            if not self._replay:
                raise MakeCaseError(f"replay: upstream drew random.{name}{args} beyond the recorded draws")
            rec_name, rec_args, value = self._replay.pop(0)
            if (rec_name, rec_args) != (name, args):
                raise MakeCaseError(f"replay: upstream drew random.{name}{args}, recorded random.{rec_name}{rec_args}")
            return value
        if name == "random":
            if not self._script:
                raise MakeCaseError("upstream drew more random.random() values than train_case forces")
            return float(self._script.pop(0))
        a, b = args
        f = self._fractions[self._randint_calls % len(self._fractions)]
        self._randint_calls += 1
        return int(a + round(f * (b - a)))

    def random(self) -> float:
        value = self._next("random", ())
        self.calls.append(("random", (), value))
        return value

    def randint(self, a: int, b: int) -> int:
        value = self._next("randint", (int(a), int(b)))
        self.calls.append(("randint", (int(a), int(b)), value))
        return value

    def __getattr__(self, name: str) -> Any:
        raise MakeCaseError(f"upstream used random.{name}, which the make-case tap does not capture")


class TorchRandomTap:
    """Stands in for ``torch`` inside ``cosyvoice.flow.flow_matching``: records ``torch.rand`` and
    ``torch.randn_like`` (drawn from the global torch RNG, or ``forced_1d`` for a 1-D ``rand``), or
    replays recorded ones; every other attribute is torch's own."""

    def __init__(self, torch_module: Any, forced_1d: Any = None, replay=None):
        self._torch = torch_module
        self._forced_1d = forced_1d
        self._replay = None if replay is None else list(replay)
        self.calls: list[tuple[str, tuple[int, ...], Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._torch, name)

    def _take(self, name: str, shape: tuple[int, ...], draw: Callable[[], Any]) -> Any:
        if self._replay is not None:
            if not self._replay:
                raise MakeCaseError(f"replay: upstream drew torch.{name}{shape} beyond the recorded draws")
            rec_name, rec_shape, value = self._replay.pop(0)
            if (rec_name, rec_shape) != (name, shape):
                raise MakeCaseError(f"replay: upstream drew torch.{name}{shape}, recorded torch.{rec_name}{rec_shape}")
            out = value.clone()
        else:
            out = draw()
        self.calls.append((name, shape, out.detach().clone()))
        return out

    def rand(self, *size: Any, **kwargs: Any) -> Any:
        shape = tuple(int(s) for s in (size[0] if len(size) == 1 and isinstance(size[0], (list, tuple)) else size))

        def draw():
            if self._forced_1d is not None and len(shape) == 1:
                forced = self._torch.tensor(self._forced_1d, dtype=kwargs.get("dtype") or self._torch.float32)
                if tuple(forced.shape) != shape:
                    raise MakeCaseError(f"forced torch.rand{shape}: {len(self._forced_1d)} values given")
                return forced
            return self._torch.rand(*size, **kwargs)

        return self._take("rand", shape, draw)

    def randn_like(self, x: Any, **kwargs: Any) -> Any:
        return self._take("randn_like", tuple(x.shape), lambda: self._torch.randn_like(x, **kwargs))


@contextlib.contextmanager
def patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    """``obj.name = value`` for the duration of the block (a module's global, say)."""
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


def loss_and_grads(module: Any, call: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``call()`` (a training forward returning {"loss", ...}) with autograd; gradients of every
    parameter that got one, by ``named_parameters`` name (tied parameters appear once)."""
    import torch

    module.zero_grad(set_to_none=True)
    with torch.enable_grad():
        out = call()
        out["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in out.items()}, grads


def same_run(a: tuple[dict[str, Any], dict[str, Any]], b: tuple[dict[str, Any], dict[str, Any]]) -> bool:
    """Two ``loss_and_grads`` results are bitwise equal (outputs and every gradient)."""
    import torch

    (out_a, grads_a), (out_b, grads_b) = a, b
    return (set(out_a) == set(out_b) and all(torch.equal(out_a[k], out_b[k]) for k in out_a)
            and set(grads_a) == set(grads_b) and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a))


def perturb_global_rngs() -> None:
    """Reseed the global RNGs before a replay: a draw the taps missed would then change the result."""
    import random

    import torch

    random.seed(987654321)
    np.random.seed(98765)
    torch.manual_seed(987654321)
