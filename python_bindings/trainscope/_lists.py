"""The one way every function turns its tensor-list arguments into a list."""

from __future__ import annotations

from collections.abc import Mapping

import torch


def tensor_list(arg, name: str, caller: str = "") -> list:
    """``arg`` as a list of tensors: None gives [], a tensor [it], a mapping (torch.func's
    ``{name: tensor}``) its values, any other iterable its items. A non-tensor entry is a TypeError
    naming ``name[i]``."""
    if arg is None:
        return []
    if isinstance(arg, torch.Tensor):
        return [arg]
    prefix = f"{caller}: " if caller else ""
    if isinstance(arg, (str, bytes)) or not hasattr(arg, "__iter__"):
        raise TypeError(f"{prefix}{name} must be a tensor or a list of tensors, got {type(arg).__name__}")
    out = list(arg.values()) if isinstance(arg, Mapping) else list(arg)
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{prefix}{name}[{i}] is {type(t).__name__}, expected a tensor"
                            + (" (a parameter without .grad?)" if t is None else ""))
    return out
