"""Training and evaluation loops shared by ``pretrain``, ``finetune`` and ``eval``.

Single process or ``torchrun`` (DDP: gloo on CPU, NCCL on GPU). Checkpoints hold model, optimizer, scheduler, step
and every rank's RNG states and are written atomically (temporary file, then rename); ``--resume`` restores them and
the step sampler replays the same batches, so the loss sequence continues as if never interrupted.
"""

import contextlib
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from pyvidfast.flux import DoubleMaskSettings, FlexiSampling
from pyvidfast.masking import dual_masks
from pyvidfast.models import create_model, registry
from pyvidfast.models.fluxvit import FluxViT
from pyvidfast.models.layers import normalize_video
from pyvidfast.models.videomae import pretrain_loss
from pyvidfast.train.data import SLOTS, ClipSpec, FlexiVideoList, StepSampler, VideoList, collate
from pyvidfast.train.flux import FluxObjective, VideoMAETeacher
from pyvidfast.train.optim import make_optimizer, make_scheduler

CHECKPOINT_NAME = "checkpoint.pth"


# ----------------------------------------------------------------------------------------------------------------
# Processes and devices


class Context:
    """Rank, world size and device of this process; initialises the process group under torchrun."""

    def __init__(self, device: str = "auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> float:
        """Mean of a scalar over ranks."""
        value = value.detach().float().reshape(1).to(self.device)
        if self.world > 1:
            dist.all_reduce(value)
            value /= self.world
        return float(value)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        values = values.to(self.device)
        if self.world > 1:
            dist.all_reduce(values)
        return values

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """RNG states as tensors and plain values, so checkpoints load with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and metrics


def save_checkpoint(path: Path, ctx: Context, model, optimizer, scheduler, step: int, args: dict) -> None:
    """Every rank contributes its RNG state; rank 0 writes a temporary file and renames it over ``path``."""
    states = [None] * ctx.world
    if ctx.world > 1:
        dist.all_gather_object(states, rng_state())
    else:
        states = [rng_state()]
    if ctx.main:
        payload = {"model": _core(model).state_dict(), "optimizer": optimizer.state_dict(),
                   "scheduler": scheduler.state_dict(), "step": step, "rng": states, "args": args}
        partial = path.with_name(path.name + ".tmp")
        torch.save(payload, partial)
        os.replace(partial, path)  # atomic on POSIX: readers see the old or the new checkpoint, never half of one
    if ctx.world > 1:
        dist.barrier()


def load_checkpoint(path: Path, ctx: Context, model, optimizer, scheduler) -> int:
    """Restores a training checkpoint; returns the number of steps already done."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    _core(model).load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    states = payload["rng"]
    if len(states) != ctx.world:
        raise ValueError(f"resume: the checkpoint was written by {len(states)} ranks; this run has {ctx.world}")
    set_rng_state(states[ctx.rank])
    return int(payload["step"])


class MetricsLog:
    """JSON lines in ``out/metrics.jsonl`` (appended on resume), and TensorBoard scalars when it is installed."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.file = open(out / "metrics.jsonl", "a") if enabled else None
        self.board = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.board = SummaryWriter(str(out / "tensorboard"))
            except ImportError:
                pass

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.board is not None:
            self.board.close()


def read_metrics(out: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _core(model):
    return getattr(model, "module", model)


# ----------------------------------------------------------------------------------------------------------------
# Training


def build_model(args) -> torch.nn.Module:
    kwargs = json.loads(args.model_kwargs) if args.model_kwargs else {}
    return create_model(args.model, pretrained=getattr(args, "init", None), **kwargs)


def is_flux(args, task: str) -> bool:
    return task == "distill" or (task == "finetune" and args.flux)


def build_flux(args, task: str) -> tuple[FluxObjective, FlexiSampling]:
    """The Flux objective of ``finetune --flux`` or ``distill`` and its flexi-sampling ranges."""
    flexi = FlexiSampling(tuple(args.flexi_frames), tuple(args.flexi_resolutions), args.min_tokens, args.max_tokens)
    if task == "finetune":
        if args.rlt:
            raise ValueError("--rlt: Flux fine-tuning selects tokens with group_topk; RLT packing does not apply")
        return FluxObjective(build_model(args), args.budgets, args.label_smoothing), flexi
    teacher_kwargs = json.loads(args.teacher_kwargs) if args.teacher_kwargs else {}
    teacher = VideoMAETeacher(create_model(args.teacher, pretrained=args.teacher_checkpoint, **teacher_kwargs))
    settings = DoubleMaskSettings(tuple(args.teacher_resolutions), args.teacher_budget,
                                  teacher.model.patch_size, teacher.model.tubelet_size, tuple(args.student_layers),
                                  tuple(args.teacher_layers))
    return FluxObjective(build_model(args), teacher=teacher, settings=settings, budget=args.budget), flexi


def train(args, task: str) -> list[float]:
    """Runs ``task`` ("pretrain", "finetune" or "distill") to ``args.steps`` (or ``args.stop_at``); returns this
    run's losses. ``finetune --flux`` and ``distill`` train a :class:`FluxObjective` on flexi-sampled clips."""
    ctx = Context(args.device)
    out = Path(args.out)
    if ctx.main:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(args.seed + ctx.rank)
    flux = is_flux(args, task)
    if flux:
        model, flexi = build_flux(args, task)
        dataset = FlexiVideoList(args.list, args.stride, flexi)
        if model.teacher is not None:
            model.teacher.model.to(ctx.device)
    else:
        model = build_model(args)
        dataset = VideoList(args.list, ClipSpec(model.num_frames, args.stride, model.img_size))
    model = model.to(ctx.device)
    core = model
    optimizer = make_optimizer(model, args.lr, args.weight_decay, args.layer_decay if task == "finetune" else 1.0,
                               betas=tuple(args.betas))
    scheduler = make_scheduler(optimizer, args.warmup_steps, args.steps, args.lr, args.min_lr)
    start = 0
    resume = out / CHECKPOINT_NAME if args.resume == "auto" else (Path(args.resume) if args.resume else None)
    if resume is not None and resume.exists():
        start = load_checkpoint(resume, ctx, model, optimizer, scheduler)
    elif args.resume and args.resume != "auto":
        raise FileNotFoundError(f"resume: no checkpoint at {resume}")
    if ctx.world > 1:
        model = torch.nn.parallel.DistributedDataParallel(  # distillation leaves the student's heads unused
            model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            find_unused_parameters=task == "distill")

    stop = min(args.stop_at or args.steps, args.steps)
    sampler = StepSampler(len(dataset), args.batch_size, ctx.rank, ctx.world, args.seed, start, stop)
    # A dedicated generator: the loader must not draw from the global RNG, which the checkpoint restores.
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=args.workers,
                        generator=torch.Generator().manual_seed(args.seed), persistent_workers=False)
    metrics = MetricsLog(out, ctx.main)
    autocast = (torch.autocast(ctx.device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext())
    losses = []
    model.train()
    progress = tqdm(total=args.steps, initial=start, disable=not ctx.main or args.quiet, desc=task, unit="step")
    step = start
    for clips, labels, seeds in loader:
        began = time.perf_counter()
        clips = clips.to(ctx.device, non_blocking=True)
        info = {}
        with autocast:
            if task == "distill":
                # The teacher's resolution of this step, from the step's seed (the same on every rank).
                teacher_resolution = core.settings.draw_teacher_resolution(
                    torch.Generator().manual_seed(seeds[0] // SLOTS))
                loss, info = model(normalize_video(clips), teacher_resolution=teacher_resolution)
            elif task == "pretrain":
                mask, decode_mask = dual_masks(seeds, core.grid, args.mask_ratio, args.decoder_mask_ratio)
                decode_mask = None if decode_mask is None else decode_mask.to(ctx.device)
                loss = pretrain_loss(model, normalize_video(clips), mask.to(ctx.device), decode_mask)
            else:
                targets = F.one_hot(labels.to(ctx.device), getattr(core, "backbone", core).num_classes).float()
                if args.mixup > 0 or args.cutmix > 0:
                    rng = np.random.default_rng(seeds[0])  # seeded per step: reproducible on resume
                    video, targets = mix_batch(normalize_video(clips), targets, args.mixup, args.cutmix, rng)
                    inputs = core.tokenize(video) if args.rlt else video
                else:
                    inputs = core.tokenize(clips) if args.rlt else normalize_video(clips)
                if flux:
                    loss, info = model(inputs, targets)
                else:
                    logits = model(inputs)
                    loss = F.cross_entropy(logits.float(), targets, label_smoothing=args.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad if args.clip_grad > 0
                                                   else float("inf"))
        lr = optimizer.param_groups[-1]["lr"]
        optimizer.step()
        scheduler.step()
        step += 1
        value = ctx.mean(loss)
        losses.append(value)
        metrics.log({"step": step, "loss": value, "lr": lr, "grad_norm": float(grad_norm),
                     "step_s": time.perf_counter() - began, **info})
        progress.update(1)
        progress.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
        if step % args.save_every == 0 or step == stop:
            save_checkpoint(out / CHECKPOINT_NAME, ctx, model, optimizer, scheduler, step, vars(args))
    progress.close()
    metrics.close()
    ctx.close()
    return losses


def mix_batch(video: torch.Tensor, targets: torch.Tensor, mixup: float, cutmix: float,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
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


# ----------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(args) -> dict:
    """Multi-view testing: softmax averaged over clips x crops per video; top-1 and top-5 accuracy."""
    ctx = Context(args.device)
    model = build_model(args)
    if args.checkpoint:
        registry.load_checkpoint(model, args.checkpoint)
    model.to(ctx.device).eval()
    flux = isinstance(model, FluxViT)
    if flux and args.rlt:
        raise ValueError("--rlt: FluxViT keeps tokens with --budget (group_topk); RLT packing does not apply")
    if not flux and args.budget is not None:
        raise ValueError(f"--budget: only FluxViT models keep a token budget; {args.model} is not one")
    spec = ClipSpec(args.frames or model.num_frames, args.stride, args.size or model.img_size, args.short_side)
    dataset = VideoList(args.list, spec)
    mine = range(ctx.rank, len(dataset), ctx.world)
    autocast = (torch.autocast(ctx.device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext())
    counts = torch.zeros(3, dtype=torch.float64)  # videos, top-1 hits, top-5 hits
    predictions = []
    for index in tqdm(mine, disable=not ctx.main or args.quiet, desc="eval", unit="video"):
        views = dataset.views(index, args.num_clips, args.num_crops).to(ctx.device)
        with autocast:
            if flux:
                logits = model(normalize_video(views), budget=args.budget)
            else:
                logits = model(model.tokenize(views) if args.rlt else normalize_video(views))
        probs = logits.float().softmax(-1).mean(0)
        label = dataset.entries[index][1]
        top = probs.topk(min(5, probs.numel())).indices.tolist()
        counts += torch.tensor([1.0, float(top[0] == label), float(label in top)], dtype=torch.float64)
        predictions.append({"index": index, "label": label, "top5": top})
    counts = ctx.sum(counts.to(torch.float64)).cpu()
    result = {"videos": int(counts[0]), "top1": float(counts[1] / counts[0]), "top5": float(counts[2] / counts[0]),
              "views": args.num_clips * args.num_crops, "frames": spec.frames, "size": spec.size,
              "rlt": bool(args.rlt), "budget": args.budget}
    if ctx.main:
        print(json.dumps(result))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "eval.json").write_text(json.dumps({**result, "predictions": predictions}, indent=1))
    ctx.close()
    return result
