"""``generate()``'s compiled decoding step without dynamo's guard checks once the step is steady.

Before every call of a compiled function dynamo checks its guards: the properties of every parameter, buffer, cached
tensor and module attribute the traced code read (some 10,000 checks for a 24-layer DCFormer++). In a decoding loop
they hold by construction from the second step on: the same model, the same cache, inputs of the same shapes, only
tensor *values* change. PyTorch's ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)`` then runs only the
guards that tell apart the function's compiled versions (none when there is one), which is safe exactly when no
call would need a new compilation.

:class:`SteadyStep` wraps ``generate()``'s compiled forward (:meth:`headmix.models.DCFormerForCausalLM
.get_compiled_call` makes a new one for every ``generate()`` call) and takes that shortcut only while it can tell the
assumption holds: after :data:`STEADY_CALLS` calls in a row whose arguments had the same *signature* (each tensor's
shape, strides, dtype, device and ``requires_grad``, every other argument's value or identity, and the grad,
inference and autocast modes) and during which dynamo compiled nothing, and only under the default compiler stance
(a caller's ``set_stance`` is left in force). A call whose signature differs runs with every guard (and may compile)
and starts the count again. What the signature cannot see — a model changed *during*
one ``generate()`` call, e.g. by a logits processor — is outside what ``generate()`` does; set :data:`SKIP_GUARDS` to
``False`` (or ``benchmarks/lm_speed.py --all-guards``) to check every guard at every step.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

SKIP_GUARDS = True  # take the shortcut in steady decoding (the module docstring); False: dynamo's guards every step
STEADY_CALLS = 2  # calls in a row with one signature, compiling nothing, before the guards are skipped


def _stance_can_skip_guards() -> bool:
    """Whether this torch's ``torch.compiler.set_stance`` takes ``skip_guard_eval_unsafe`` (torch >= 2.6)."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance is not None and "skip_guard_eval_unsafe" in inspect.signature(stance).parameters


def _default_stance() -> bool:
    """Whether the compiler's stance is the default one (no ``set_stance("force_eager")`` or other of the caller's:
    the shortcut would replace it for the call, so it is taken only under the default)."""
    stance = getattr(torch._dynamo.eval_frame, "_stance", None)
    return (stance is not None and stance.stance == "default" and stance.backend is None
            and not stance.skip_guard_eval_unsafe)


def _compilations() -> int | None:
    """Compilations dynamo has started in this process, over every frame (its counter of compile ids; a cache hit does
    not count), or ``None`` where this torch has no such counter (then no call counts as steady)."""
    from torch._dynamo import convert_frame

    counter = getattr(convert_frame, "FRAME_COMPILE_COUNTER", None)
    return None if counter is None else sum(counter.values())


def _describe(value: Any) -> Any:
    """A hashable description of one argument: what the compiled code's guards could depend on."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.device, value.requires_grad)
    if value is None or isinstance(value, (bool, int, float, str)):
        return (type(value), value)
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_describe(v) for v in value))
    return ("object", id(value))  # the cache, a config: the same object or not


def signature(args: tuple, kwargs: dict) -> tuple:
    """What two calls must share for the second to reuse the first's compiled code without a check: the arguments'
    descriptions and the global modes dynamo guards (grad, inference, autocast)."""
    modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
             torch.is_autocast_enabled("cuda") if torch.cuda.is_available() else False,
             torch.is_autocast_enabled("cpu"))
    return (tuple(_describe(a) for a in args), tuple(sorted((k, _describe(v)) for k, v in kwargs.items())), modes)


class SteadyStep:
    """Call ``compiled`` as it is, and with dynamo's guards skipped once the calls are steady (module docstring).

    ``steady_calls`` counts the calls made with the guards skipped (for tests and benchmarks)."""

    def __init__(self, compiled: Callable, steady_after: int = STEADY_CALLS) -> None:
        self.compiled = compiled
        self.steady_after = steady_after
        self.steady_calls = 0
        self._last: tuple | None = None
        self._repeats = 0  # calls in a row with the signature self._last that compiled nothing
        self._enabled = SKIP_GUARDS and _stance_can_skip_guards()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self._enabled:
            return self.compiled(*args, **kwargs)
        sig = signature(args, kwargs)
        if sig == self._last and self._repeats >= self.steady_after and _default_stance():
            self.steady_calls += 1
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self.compiled(*args, **kwargs)
        before = _compilations()
        out = self.compiled(*args, **kwargs)
        compiled_nothing = before is not None and _compilations() == before
        self._repeats = self._repeats + 1 if sig == self._last and compiled_nothing else int(compiled_nothing)
        self._last = sig
        return out
