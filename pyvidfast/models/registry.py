"""Name -> constructor registry for the model zoo."""

import fnmatch
from typing import Callable

import torch
from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
# Families register on import; listed here so create_model finds every name without importing by hand.
_FAMILIES = ("videomae", "fluxvit", "videoxl")


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: registers a constructor under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is registered twice")
    _MODELS[fn.__name__] = fn
    return fn


def _import_families() -> None:
    import importlib

    for family in _FAMILIES:
        try:
            importlib.import_module(f"pyvidfast.models.{family}")
        except ModuleNotFoundError as e:
            if e.name != f"pyvidfast.models.{family}":
                raise


def list_models(pattern: str = "*") -> list[str]:
    _import_families()
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, pretrained: str | None = None, **kwargs) -> nn.Module:
    """Builds a registered model; ``pretrained`` is a local checkpoint path (official or Hugging Face layout),
    loaded with the family's ``load_checkpoint`` (strict)."""
    _import_families()
    if name not in _MODELS:
        raise ValueError(f"name: unknown model {name!r}; available: {list_models()}")
    model = _MODELS[name](**kwargs)
    if pretrained is not None:
        loader = getattr(model, "load_checkpoint", None)
        if loader is None:
            model.load_state_dict(torch.load(pretrained, map_location="cpu", weights_only=True), strict=True)
        else:
            loader(pretrained)
    return model
