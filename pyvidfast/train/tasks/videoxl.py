"""Video-XL supervised fine-tuning (``python -m pyvidfast.train videoxl-sft``), the official recipe on the shared
loop.

- Data: a LLaVA-layout JSON/JSONL file (:mod:`pyvidfast.videoxl.data`), frames as the official scripts choose
  them (1 fps under ``--frames-upbound`` seconds, else that many uniform), images tiled ``anyres``.
- Loss: next-token cross-entropy on the answer tokens only, summed over the whole batch and divided by their
  count (the official ``Memory.update_loss``/``output``: per-window sums over the count of the whole sequence).
  The answers follow the video, so in training, as in the official code, they form the last, never-compressed
  step, and reach the video only through the VSTs (whose keys and values are not detached: the gradient flows
  back through every window into the beacon projections, the projector and, unfrozen, CLIP).
- Ratios: each window's ratio is drawn from ``--beacon-ratios`` (image stage 2 4 8 12 16, video stage 2 4 8 as
  released) by a generator seeded with the step's seed, so ``--resume`` replays them; ``--ratio-schedule
  0:2,4 500:2,4,8`` switches the set at given steps (the paper's curriculum from small to large ratios).
- Stages: ``--stage projector`` (official stage 1: the projector alone, the plain LLaVA path without VSTs),
  ``--stage full`` (LLM + beacon parameters + projector; ``--unfreeze-vision`` adds CLIP).
- Batches: several samples of different lengths per step, packed by the model; samples grouped by window
  count (:class:`pyvidfast.videoxl.data.StrideGroupedSampler`) so the window steps of a batch are full.
- ``--gradient-checkpointing`` recomputes each decoder layer (and CLIP layer) in the backward pass.
"""

import argparse
from typing import Sequence

import torch
from torch import Tensor

from pyvidfast.models.videoxl import VideoXL, check_ratios
from pyvidfast.train.tasks.base import Task, register_task
from pyvidfast.videoxl.data import (DEFAULT_GRID_PINPOINTS, IGNORE_INDEX, SFTBatch, SFTDataset, SFTSample,
                                    StrideGroupedSampler, collate_samples)

STAGES = ("projector", "full")


def parse_ratio_schedule(text: Sequence[str]) -> list[tuple[int, tuple[int, ...]]]:
    """``["0:2,4", "500:2,4,8"]`` -> [(0, (2, 4)), (500, (2, 4, 8))], sorted by step; must start at step 0."""
    schedule = []
    for item in text:
        step, _, ratios = item.partition(":")
        try:
            schedule.append((int(step), tuple(int(r) for r in ratios.split(","))))
        except ValueError:
            raise ValueError(f"--ratio-schedule: expected STEP:R[,R...] items; got {item!r}") from None
    schedule.sort()
    if not schedule or schedule[0][0] != 0:
        raise ValueError(f"--ratio-schedule: the first item must start at step 0; got {text}")
    return schedule


def ratios_at(schedule: list[tuple[int, tuple[int, ...]]], step: int) -> tuple[int, ...]:
    """The ratios of the last schedule item starting at or before ``step``."""
    return [ratios for start, ratios in schedule if start <= step][-1]


def set_trainable(model: VideoXL, stage: str, unfreeze_vision: bool = False) -> None:
    """The released stages: ``projector`` trains ``mm_projector`` only; ``full`` trains the LLM, the beacon
    parameters and the projector, and the CLIP tower with ``unfreeze_vision``."""
    if stage not in STAGES:
        raise ValueError(f"stage: expected one of {STAGES}; got {stage!r}")
    model.requires_grad_(stage == "full")
    model.model.mm_projector.requires_grad_(True)
    model.model.vision_tower.requires_grad_(stage == "full" and unfreeze_vision)


def pad_batch(samples: Sequence[SFTSample], pad_id: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded ids, attention mask and labels ``[B, L]`` of the samples."""
    width = max(len(s.input_ids) for s in samples)
    device = samples[0].input_ids.device
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long, device=device)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(samples):
        ids[b, :len(s.input_ids)], labels[b, :len(s.labels)], mask[b, :len(s.input_ids)] = s.input_ids, s.labels, 1
    return ids, mask, labels


def sft_loss(model: VideoXL, samples: Sequence[SFTSample], ratios: int | Sequence[int], generator: torch.Generator,
             compress: bool = True, keep_vsts: bool = True) -> tuple[Tensor, dict]:
    """The answer loss of a batch of samples (the model's forward: summed over the batch's labelled tokens,
    divided by their count) and its metrics: answer tokens, frames, windows, and the ratio of every window."""
    ids, mask, labels = pad_batch(samples)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, images=[s.pixels for s in samples],
                modalities=[s.modality for s in samples], ratio=ratios, generator=generator, compress=compress,
                keep_vsts=keep_vsts)
    frames = sum(0 if s.pixels is None else len(s.pixels) - (s.modality == "image") for s in samples)
    return out.loss, {"answer_tokens": int((labels[:, 1:] != IGNORE_INDEX).sum()), "frames": frames,
                      "windows": sum(len(r) for r in out.ratios), "ratios": out.ratios}


@register_task
class VideoXLSFT(Task):
    """``videoxl-sft``: Video-XL fine-tuning of an official-layout checkpoint folder."""

    name = "videoxl-sft"
    find_unused_parameters = True  # the last layer's beacon_q_proj never gets a gradient (no one reads VST outputs)

    def __init__(self, model: VideoXL, dataset: SFTDataset, stage: str, schedule, seed: int):
        super().__init__(model, dataset)
        self.stage, self.schedule, self.seed = stage, schedule, seed

    @classmethod
    def build(cls, args) -> "VideoXLSFT":
        model = VideoXL.from_pretrained(args.checkpoint)
        tokenizer = model.tokenizer
        if tokenizer is None:
            raise ValueError(f"--checkpoint: {args.checkpoint!r} holds no tokenizer files")
        if args.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        set_trainable(model, args.stage, args.unfreeze_vision)
        schedule = (parse_ratio_schedule(args.ratio_schedule) if args.ratio_schedule
                    else [(0, tuple(args.beacon_ratios))])
        for _, ratios in schedule:
            check_ratios(ratios, model.settings.window, "--beacon-ratios/--ratio-schedule")
        pinpoints = args.image_grid_pinpoints or getattr(model.config, "image_grid_pinpoints", None) \
            or DEFAULT_GRID_PINPOINTS
        dataset = SFTDataset(args.data, tokenizer, model.model.vision_tower.image_size, model.tokens_per_frame,
                             model.settings.window, root=args.data_root, frames_upbound=args.frames_upbound,
                             video_fps=args.video_fps, grid_pinpoints=pinpoints)
        return cls(model, dataset, args.stage, schedule, args.seed)

    # the loop's hooks: samples of a step share a window count; samples of different lengths stay a list
    collate = staticmethod(collate_samples)

    def batch_sampler(self, global_batch: int, rank: int, world: int, seed: int, start: int, stop: int):
        return StrideGroupedSampler(self.dataset.window_counts(), global_batch, rank, world, seed, start, stop)

    def step_of(self, batch: SFTBatch) -> int:
        """The step a batch belongs to (its sample seeds encode it: :func:`pyvidfast.train.data.sample_seed`)."""
        return batch.step_seed - self.seed * 1_000_003

    def forward(self, batch: SFTBatch) -> tuple[Tensor, dict]:
        generator = torch.Generator().manual_seed(batch.step_seed)
        return sft_loss(self.model, batch.samples, ratios_at(self.schedule, self.step_of(batch)), generator,
                        compress=self.stage == "full")


def add_parser(sub, training) -> argparse.ArgumentParser:
    """The ``videoxl-sft`` command; ``training`` adds the loop's shared flags (lr, steps, ...)."""
    p = sub.add_parser("videoxl-sft", help="Video-XL fine-tuning (VSTs; LLaVA-layout JSON/JSONL data)")
    p.add_argument("--data", required=True, help="JSON list or JSON lines of LLaVA-layout samples")
    p.add_argument("--data-root", default=None, help="folder the samples' paths start at (default: the file's)")
    p.add_argument("--checkpoint", required=True, help="official-layout Video-XL folder (config, weights, tokenizer)")
    p.add_argument("--model", default="videoxl_qwen2_7b", help=argparse.SUPPRESS)
    p.add_argument("--model-kwargs", default="", help=argparse.SUPPRESS)
    p.add_argument("--stage", choices=STAGES, default="full",
                   help="projector: stage 1 (projector only, no VSTs); full: LLM + beacon params + projector")
    p.add_argument("--unfreeze-vision", action="store_true", help="also train the CLIP tower (stage full)")
    p.add_argument("--beacon-ratios", type=int, nargs="+", default=[2, 4, 8],
                   help="ratios drawn per window (video stage 2 4 8; image stage 2 4 8 12 16)")
    p.add_argument("--ratio-schedule", nargs="+", default=None,
                   help="curriculum: STEP:R,R,... items (e.g. 0:2,4 500:2,4,8,12,16) replacing --beacon-ratios")
    p.add_argument("--frames-upbound", type=int, default=128,
                   help="1 fps for videos shorter than this many seconds, else this many uniform frames")
    p.add_argument("--video-fps", type=float, default=1.0, help="frames per second sampled below the upbound")
    p.add_argument("--image-grid-pinpoints", default=None,
                   help="anyres tilings (default: the checkpoint's config, else (1x1),...,(7x7))")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in the backward pass")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    training(p, lr=1e-5, weight_decay=0.0, betas=(0.9, 0.999))
    return p
