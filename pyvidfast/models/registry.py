"""Model registry and checkpoint loader, timm style.

Each family file registers its constructors with :func:`register_model` and defines a pure
``checkpoint_filter_fn(state_dict, model) -> state_dict`` (official/Hugging Face names -> this model's names,
position-table resampling, head mapping). :func:`load_checkpoint` reads any checkpoint layout, applies that filter
and loads strictly. Families are found by importing every module of :mod:`pyvidfast.models` (once, on first use),
so a new family needs no entry here.
"""

import fnmatch
import importlib
import json
import pkgutil
import sys
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import Tensor, nn

StateDict = dict[str, Tensor]
FilterFn = Callable[[StateDict, nn.Module], StateDict]

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_FILTERS: dict[str, FilterFn] = {}
_NOT_FAMILIES = {"registry", "layers"}
_families_imported = False

# Keys a training framework wraps a state dict in (official VideoMAE/FluxViT checkpoints use "model"/"module").
_WRAPPERS = ("model", "module", "state_dict", "model_state")


def register_model(fn: Callable[..., nn.Module] | None = None, *, checkpoint_filter_fn: FilterFn | None = None):
    """Decorator registering a constructor under its function name; ``@register_model`` or
    ``@register_model(checkpoint_filter_fn=f)`` (default: the ``checkpoint_filter_fn`` of the model's module)."""

    def register(constructor: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = constructor.__name__
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        _MODELS[name] = constructor
        if checkpoint_filter_fn is not None:
            _FILTERS[name] = checkpoint_filter_fn
        return constructor

    return register if fn is None else register(fn)


def _import_families() -> None:
    global _families_imported
    if _families_imported:
        return
    import pyvidfast.models as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in _NOT_FAMILIES and not module.name.startswith("_"):
            importlib.import_module(f"{package.__name__}.{module.name}")
    _families_imported = True


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob ``pattern``, sorted."""
    _import_families()
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, pretrained: str | Path | None = None, **kwargs) -> nn.Module:
    """Builds a registered model; keyword arguments override its configuration. ``pretrained``: a local
    checkpoint (any layout :func:`load_checkpoint` reads), loaded strictly."""
    _import_families()
    if name not in _MODELS:
        raise ValueError(f"name: unknown model {name!r}; available: {list_models()}")
    model = _MODELS[name](**kwargs)
    if pretrained is not None:
        load_checkpoint(model, pretrained, filter_fn=_FILTERS.get(name))
    return model


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint files


def _checkpoint_file(path: Path) -> Path:
    """The weights file of a checkpoint path (a file, or a Hugging Face folder: single or sharded)."""
    if not path.is_dir():
        if not path.exists():
            raise FileNotFoundError(f"path: no checkpoint at {path}")
        return path
    for name in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json"):
        if (path / name).exists():
            return path / name
    raise FileNotFoundError(f"path: {path} holds none of model.safetensors, pytorch_model.bin or their "
                            f".index.json")


def _read_file(path: Path) -> StateDict:
    if path.name.endswith(".index.json"):  # sharded: the index maps each tensor to its shard
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        state: StateDict = {}
        for shard in shards:
            state.update(_read_file(path.parent / shard))
        return state
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".pth", ".pt", ".bin", ".pyth"):  # .pyth: SlowFast (UniFormerV2) checkpoints
        return torch.load(path, map_location="cpu", weights_only=True)
    raise ValueError(f"path: {path.name} is not a .pth/.pt/.pyth/.bin/.safetensors file or a Hugging Face folder")


def read_state_dict(path: str | Path | Mapping[str, Tensor]) -> StateDict:
    """The tensors of a checkpoint: a ``.pth``/``.pt``/``.pyth``/``.bin`` file (``torch.load(weights_only=True)``),
    a ``.safetensors`` file or a Hugging Face folder (``model.safetensors``, ``pytorch_model.bin`` or their sharded
    ``.index.json``), with ``model``/``module``/``state_dict``/``model_state`` nesting unwrapped. A mapping is taken
    as an already read checkpoint."""
    state = dict(path) if isinstance(path, Mapping) else _read_file(_checkpoint_file(Path(path)))
    for _ in range(len(_WRAPPERS)):  # e.g. {"model": {"module": {...}}}
        wrapper = next((w for w in _WRAPPERS if isinstance(state.get(w), Mapping)), None)
        if wrapper is None:
            break
        state = dict(state[wrapper])
    return state


def read_hf_config(path: str | Path | Mapping[str, Tensor]) -> dict | None:
    """The Hugging Face ``config.json`` of a checkpoint folder (or beside a ``.safetensors``/``.bin`` weights
    file of one), else None."""
    if isinstance(path, Mapping):
        return None
    path = Path(path)
    if not path.is_dir() and not path.name.endswith((".safetensors", ".bin", ".index.json")):
        return None
    config = (path if path.is_dir() else path.parent) / "config.json"
    return json.loads(config.read_text()) if config.exists() else None


def load_checkpoint(model: nn.Module, path: str | Path | Mapping[str, Tensor], strict: bool = True,
                    filter_fn: FilterFn | None = None, apply_config: bool = True) -> nn.Module:
    """Loads a checkpoint into ``model``: :func:`read_state_dict`, then the family's ``checkpoint_filter_fn``
    (``filter_fn``, else the one of the model's module), then ``load_state_dict``. ``strict``: any missing or
    unexpected key raises a RuntimeError naming them. ``apply_config``: a family's ``checkpoint_config_fn(model,
    state_dict, hf_config)`` may adapt settings that are not tensors (e.g. Hugging Face LayerNorm epsilons) to the
    checkpoint. Returns the model."""
    state = read_state_dict(path)
    module = sys.modules[type(model).__module__]
    filter_fn = filter_fn or getattr(module, "checkpoint_filter_fn", None)
    filtered = filter_fn(state, model) if filter_fn is not None else state
    missing, unexpected = model.load_state_dict(filtered, strict=False)
    if strict and (missing or unexpected):
        raise RuntimeError(f"path: the checkpoint does not fit {type(model).__name__}: missing keys "
                           f"{_some(missing)}, unexpected keys {_some(unexpected)}")
    config_fn = getattr(module, "checkpoint_config_fn", None)
    if apply_config and config_fn is not None:
        config_fn(model, state, read_hf_config(path))
    return model


def _some(keys: list[str], limit: int = 8) -> str:
    return f"{keys[:limit]}{' ...' if len(keys) > limit else ''}"
