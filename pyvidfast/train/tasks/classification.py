"""Classification fine-tuning (``python -m pyvidfast.train finetune``): cross-entropy on soft targets (label
smoothing, mixup / CutMix), on dense clips or, with ``--rlt``, on the RLT-packed tokens of the model's
``tokenize`` (VideoMAE V2). Also the evaluation of any classifier no family task claims."""

import numpy as np
import torch.nn.functional as F
from torch import Tensor, nn

from pyvidfast.train.data import Batch
from pyvidfast.train.tasks.base import Task, build_model, model_clips, model_options, register_task


def mix_batch(video: Tensor, targets: Tensor, mixup: float, cutmix: float,
              rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """Mixup (blend) or CutMix (paste a box, the same in every frame) of each clip with the batch's reversed
    order; the one-hot targets mix in the same proportion. With both alphas set, each step picks one at random."""
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(rng.beta(alpha, alpha))
    other = video.flip(0)
    if use_cutmix:
        height, width = video.shape[-2:]
        box_h, box_w = int(height * (1 - lam) ** 0.5), int(width * (1 - lam) ** 0.5)
        top, left = int(rng.integers(height - box_h + 1)), int(rng.integers(width - box_w + 1))
        video = video.clone()
        video[..., top:top + box_h, left:left + box_w] = other[..., top:top + box_h, left:left + box_w]
        lam = 1 - box_h * box_w / (height * width)
    else:
        video = lam * video + (1 - lam) * other
    return video, lam * targets + (1 - lam) * targets.flip(0)


def check_rlt(model: nn.Module, rlt: bool) -> None:
    if rlt and not hasattr(model, "tokenize"):
        raise ValueError(f"--rlt: {type(model).__name__} has no RLT path (tokenize); VideoMAE V2 models have one")


@register_task
class Classification(Task):
    """Fine-tuning on the list's labels. ``--rlt``: the model runs on ``model.tokenize(video)`` (the mixed clips
    when mixing is on)."""

    name = "finetune"

    def __init__(self, model, dataset, label_smoothing: float = 0.0, mixup: float = 0.0, cutmix: float = 0.0,
                 rlt: bool = False):
        super().__init__(model, dataset)
        check_rlt(model, rlt)
        self.label_smoothing, self.mixup, self.cutmix, self.rlt = label_smoothing, mixup, cutmix, rlt

    @classmethod
    def build(cls, args) -> "Classification":
        model = build_model(args.model, model_options(args), args.init)
        return cls(model, model_clips(args, model), args.label_smoothing, args.mixup, args.cutmix, args.rlt)

    def forward(self, batch: Batch) -> tuple[Tensor, dict]:
        video, targets = batch.video, F.one_hot(batch.labels, self.model.num_classes).float()
        if self.mixup > 0 or self.cutmix > 0:
            rng = np.random.default_rng(batch.seeds[0])  # seeded per step: reproducible on resume
            video, targets = mix_batch(video, targets, self.mixup, self.cutmix, rng)
        logits = self.model(self.model.tokenize(video) if self.rlt else video)
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing), {}

    @classmethod
    def eval_shape(cls, model: nn.Module, args) -> tuple[int, int]:
        if args.budget is not None:
            raise ValueError(f"--budget: only FluxViT models keep a token budget; {args.model} is not one")
        check_rlt(model, args.rlt)
        return super().eval_shape(model, args)

    @classmethod
    def predict(cls, model: nn.Module, video: Tensor, args) -> Tensor:
        return model(model.tokenize(video) if args.rlt else video)
