"""Model zoo, timm style: one file per family registers its constructors; ``create_model(name, pretrained=path)``."""

from pyvidfast.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
