"""AdamW parameter groups (no weight decay on biases, norms and tokens; layer-wise lr decay) and the cosine
schedule with linear warm-up, as the VideoMAE V2 fine-tuning recipe uses them."""

import math

import torch
from torch import nn

NO_DECAY_NAMES = ("pos_embed", "mask_token", "length_embed", "cls_token")


def layer_id(name: str, depth: int) -> int:
    """0 for the patch embedding and tokens, i + 1 for block i, depth + 1 for the rest (fc_norm, head)."""
    if name.startswith(("patch_embed.", "pos_embed", "length_embed", "mask_token", "cls_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0) -> list[dict]:
    """Groups with an ``lr_scale``: ``layer_decay ** (depth + 1 - layer_id)`` when the model has ``blocks`` and
    layer_decay < 1, else 1. Biases, 1-D parameters (norms, q/v biases) and tokens get no weight decay. A training
    objective that wraps its model as ``backbone`` (``pyvidfast.train.tasks.fluxvit``) is grouped by the backbone's names."""
    depth = len(getattr(getattr(model, "backbone", model), "blocks", []))
    use_layers = layer_decay < 1.0 and depth > 0
    groups: dict[tuple[int, bool], dict] = {}
    for full_name, param in model.named_parameters():
        name = full_name.removeprefix("backbone.")
        if not param.requires_grad:
            continue
        decay = param.ndim > 1 and not name.endswith(".bias") and not name.startswith(NO_DECAY_NAMES)
        layer = layer_id(name, depth) if use_layers else depth + 1
        group = groups.setdefault((layer, decay), {
            "params": [], "names": [], "weight_decay": weight_decay if decay else 0.0,
            "lr_scale": layer_decay ** (depth + 1 - layer) if use_layers else 1.0,
        })
        group["params"].append(param)
        group["names"].append(full_name)
    return [groups[key] for key in sorted(groups)]


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, layer_decay: float = 1.0,
                   betas=(0.9, 0.999)) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay, layer_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr, betas=betas)


def cosine_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up from 0 over warmup_steps, then cosine from 1 down to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer, warmup_steps: int, total_steps: int, lr: float, min_lr: float):
    ratio = min_lr / lr if lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_factor(step, warmup_steps, total_steps, ratio))
