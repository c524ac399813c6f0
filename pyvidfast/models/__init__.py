"""Model zoo, timm style: one file per family registers its constructors on the shared layers
(:mod:`pyvidfast.models.layers`); ``create_model(name, pretrained=path)`` builds one and ``load_checkpoint`` loads
any checkpoint layout strictly. See docs/models.md."""

from pyvidfast.models.layers import DataConfig, Packing
from pyvidfast.models.registry import (create_model, list_models, load_checkpoint, read_state_dict,
                                       register_model)

__all__ = ["DataConfig", "Packing", "create_model", "list_models", "load_checkpoint", "read_state_dict",
           "register_model"]
