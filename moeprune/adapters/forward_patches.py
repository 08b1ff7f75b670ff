"""The one owner of `forward` replacements on model instances.

Several parts of moeprune replace a module's `forward` on the instance: calibration routes experts
through the routed-token capture, the layer engine records decoder-layer calls, MoNE installs its
novice forward and NAEE its dynamic skipping (wrapping whatever was there). Each used to keep its
own undo, and an undo that deleted "the instance forward" could drop another owner's wrapper. Here
every replacement is pushed on a per-module stack with its owner's name: an owner cannot patch a
module twice, undos run last-in first-out and restore exactly what they replaced, and a
permanent install (`install_forward`) replaces its own earlier install instead of stacking.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

_STACK = "_moeprune_forward_patches"  # [(owner, the instance forward it replaced or None)]


def current_forward(module: nn.Module) -> Callable | None:
    """The instance `forward` installed on `module` (None: the class's own)."""
    return module.__dict__.get("forward")


def patch_owners(module: nn.Module) -> list[str]:
    """Owners of the patches on `module`, first installed first."""
    return [owner for owner, _ in module.__dict__.get(_STACK, [])]


def patch_forward(module: nn.Module, forward: Callable, owner: str) -> Callable[[], None]:
    """Replace `module.forward` by `forward` for `owner`; returns the undo (last in, first out)."""
    stack = module.__dict__.setdefault(_STACK, [])
    if any(o == owner for o, _ in stack):
        raise RuntimeError(f"{type(module).__name__}.forward is already patched by {owner}")
    stack.append((owner, current_forward(module)))
    module.__dict__["forward"] = forward

    def undo() -> None:
        stack_now = module.__dict__.get(_STACK, [])
        if not stack_now or stack_now[-1][0] != owner:
            raise RuntimeError(f"{owner}'s patch of {type(module).__name__}.forward undone out of order "
                               f"(patched by {patch_owners(module)})")
        _, previous = stack_now.pop()
        if previous is None:
            module.__dict__.pop("forward", None)
        else:
            module.__dict__["forward"] = previous
        if not stack_now:
            module.__dict__.pop(_STACK, None)

    return undo


def install_forward(module: nn.Module, make: Callable[[Callable | None], Callable], owner: str) -> None:
    """A permanent replacement (part of the edited model): `make(inner)` builds the new forward
    around `inner`, the forward below `owner`'s earlier install (None: the class's). Installing
    again replaces `owner`'s install; it must be the top one."""
    stack = module.__dict__.get(_STACK, [])
    if stack and stack[-1][0] == owner:
        _, previous = stack.pop()
        module.__dict__["forward"] = previous
        if previous is None:
            module.__dict__.pop("forward", None)
    patch_forward(module, make(current_forward(module)), owner)
