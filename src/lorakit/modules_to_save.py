"""``ModulesToSave``: a module trained whole, a trainable copy per adapter (PEFT's ``modules_to_save``)."""

from __future__ import annotations

import copy
import warnings
from typing import Any

from torch import nn

from lorakit.routing import route_of


class ModulesToSave(nn.Module):
    """A module trained whole: the frozen ``original_module`` and a trainable copy per adapter."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False
        self.train(original_module.training)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "original_module":
                raise
            return getattr(self.original_module, name)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def add_adapter(self, adapter_name: str) -> None:
        copied = copy.deepcopy(self.original_module)
        self.modules_to_save[adapter_name] = copied.train(self.training)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if adapter_name in self.active_adapters:
            self.active_adapters.remove(adapter_name)

    def set_active(self, adapter_names: list[str]) -> None:
        self.active_adapters = list(adapter_names)

    def active_module(self) -> nn.Module:
        """The copy of the active adapter that has one, else the original.

        Copies of whole modules cannot be summed like LoRA updates: with several active adapters that have
        a copy, the first is used and a warning says so (PEFT refuses this case outright).
        """
        if self.disabled:
            return self.original_module
        with_copy = [name for name in self.active_adapters if name in self.modules_to_save]
        if len(with_copy) > 1:
            warnings.warn(f"adapters {with_copy} are active together and each has its own copy of this "
                          f"module ({type(self.original_module).__name__}); copies cannot be combined, "
                          f"so only {with_copy[0]!r}'s is used", stacklevel=3)
        return self.modules_to_save[with_copy[0]] if with_copy else self.original_module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        route = route_of(self)
        if route is not None:
            return route.forward(self, *args, **kwargs)
        return self.active_module()(*args, **kwargs)
