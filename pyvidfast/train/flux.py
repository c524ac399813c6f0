"""Flux training objectives for the training loop: ``finetune --flux`` and ``distill``.

The loop trains an :class:`FluxObjective`, a module whose ``forward`` returns the loss, so DDP synchronises the
gradients of exactly what ran. It holds the FluxViT as ``backbone`` (checkpoint keys ``backbone.*``, which
``FluxViT.load_checkpoint`` reads back) and, for distillation, the trainable projectors; the frozen teacher is kept
out of the module tree, so it is neither checkpointed nor wrapped by DDP.

- ``finetune --flux``: the official multi-budget loss (:func:`pyvidfast.flux.multi_budget_loss`) on clips of the
  step's flexi setting (:class:`pyvidfast.train.data.FlexiVideoList`).
- ``distill``: double-mask distillation (:func:`pyvidfast.flux.double_mask_step`) from a frozen VideoMAE V2 encoder
  of our zoo. This is OUR READING of the paper (the official pretraining code is not public): the teacher sees the
  same frames at its own resolution drawn per step, keeps ``teacher_budget`` tokens chosen by ``group_topk`` on its
  patch embeddings, and its position table is the sinusoid table of the grid it sees (what the official model
  built at that size uses).
"""

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pyvidfast.flux import DoubleMaskSettings, double_mask_step, multi_budget_loss
from pyvidfast.models.fluxvit import HEAD_BUDGETS, FluxViT
from pyvidfast.models.videomae import VisionTransformer, sinusoid_table


def resize_frames(video: Tensor, resolution: int) -> Tensor:
    """[B, C, T, H, W] -> [B, C, T, R, R], bilinear with antialiasing, frame by frame."""
    b, c, t = video.shape[:3]
    frames = video.transpose(1, 2).flatten(0, 1)
    frames = F.interpolate(frames, size=(resolution, resolution), mode="bilinear", align_corners=False,
                           antialias=True)
    return frames.view(b, t, c, resolution, resolution).transpose(1, 2)


class VideoMAETeacher:
    """A frozen VideoMAE V2 encoder in the two roles :func:`double_mask_step` asks of a teacher."""

    def __init__(self, model: VisionTransformer):
        self.model = model.eval().requires_grad_(False)

    def embed(self, video: Tensor) -> Tensor:
        """Patch embeddings [B, T', H'W', C] (scored by ``group_topk`` for the teacher's mask)."""
        x = self.model.patch_embed.proj(video.to(self.model.patch_embed.proj.weight.dtype))
        return x.flatten(3).permute(0, 2, 3, 1)

    def forward(self, video: Tensor, keep: Tensor, layers: Sequence[int]) -> list[Tensor]:
        """Outputs [B, Kt, C] of blocks ``layers`` on the kept tokens ``keep`` [B, Kt]."""
        x = self.embed(video).flatten(1, 2)
        x = x + sinusoid_table(x.shape[1], x.shape[2]).to(x)
        x = x.gather(1, keep.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        hidden = []
        for i, block in enumerate(self.model.blocks):
            x = block(x)
            if i in layers:
                hidden.append(x)
            if len(hidden) == len(layers):
                break  # later blocks feed no target
        return hidden


class FluxObjective(nn.Module):
    """FluxViT plus its Flux loss. Without a teacher: multi-budget fine-tuning at ``budgets`` (one per head);
    with one: double-mask distillation keeping ``budget`` student tokens."""

    def __init__(self, backbone: FluxViT, budgets: Sequence[int] = HEAD_BUDGETS, label_smoothing: float = 0.0,
                 teacher: VideoMAETeacher | None = None, settings: DoubleMaskSettings = DoubleMaskSettings(),
                 budget: int = 2048):
        super().__init__()
        if not isinstance(backbone, FluxViT):
            raise TypeError(f"model: Flux training needs a FluxViT; got {type(backbone).__name__}")
        if len(budgets) != len(backbone.head):
            raise ValueError(f"budgets: expected one per head ({len(backbone.head)}); got {list(budgets)}")
        self.backbone = backbone
        self.budgets, self.label_smoothing = tuple(budgets), label_smoothing
        self.settings, self.budget = settings, budget
        self.__dict__["teacher"] = teacher  # not a submodule: frozen, not checkpointed, not seen by DDP
        if teacher is not None:
            if len(settings.student_layers) != len(settings.teacher_layers):
                raise ValueError(f"layers: {settings.student_layers} (student) and {settings.teacher_layers} "
                                 "(teacher) must pair up")
            self.projectors = nn.ModuleList(nn.Linear(backbone.embed_dim, teacher.model.embed_dim)
                                            for _ in settings.student_layers)

    def forward(self, video: Tensor, targets: Tensor | None = None,
                teacher_resolution: int | None = None) -> tuple[Tensor, dict]:
        """Loss of one batch of normalized clips [B, 3, T, R, R] (soft ``targets`` [B, classes] for fine-tuning,
        the teacher's ``teacher_resolution`` for distillation) and what to log about it."""
        frames, tokens = video.shape[2], video.shape[2] * (video.shape[3] // self.backbone.patch_size) ** 2
        info = {"frames": frames, "resolution": video.shape[3], "tokens": tokens}
        if self.teacher is None:
            def criterion(logits: Tensor, target: Tensor) -> Tensor:
                return F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)

            loss, _, kept = multi_budget_loss(self.backbone, video, targets, criterion, self.budgets)
            return loss, {**info, "kept": kept}
        teacher_video = resize_frames(video, teacher_resolution)
        loss = double_mask_step(self.backbone, video, self.budget, teacher_video, self.teacher.embed,
                                self.teacher.forward, self.projectors, self.settings)
        return loss, {**info, "teacher_resolution": teacher_resolution}
