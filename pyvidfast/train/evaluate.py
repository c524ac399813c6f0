"""Multi-view evaluation (``python -m pyvidfast.train eval``): softmax per view, summed over clips x crops per
video (the official UniFormerV2 ``test_softmax``; the same ranking as their mean); top-1 and top-5 accuracy. Views
follow ``--sampling``: dense clips spread over the video, or interleaved segment samples. How a model classifies
its views (dense, ``--rlt``, FluxViT's ``--budget``) comes from its family's task
(:func:`pyvidfast.train.tasks.eval_task`)."""

import json
from pathlib import Path

import torch
from tqdm import tqdm

from pyvidfast.io import VideoDataset
from pyvidfast.train.data import clip_sampler
from pyvidfast.train.loop import Context, autocast
from pyvidfast.train.recipe import apply_recipe, describe
from pyvidfast.train.tasks import eval_task
from pyvidfast.train.tasks.base import build_model, model_options


@torch.no_grad()
def evaluate(args) -> dict:
    ctx = Context(args.device)
    settings = apply_recipe(args)
    if ctx.main and not args.quiet:
        print(describe(settings), flush=True)
    model = build_model(args.model, model_options(args), args.checkpoint)
    model.to(ctx.device).eval()
    task = eval_task(model)
    frames, size = task.eval_shape(model, args)
    config = model.data_config
    sampler = clip_sampler(args.sampling, frames, args.stride, args.num_clips)
    dataset = VideoDataset(args.list, sampler, size=args.short_side or size, crop=size, num_crops=args.num_crops,
                           mean=config.mean, std=config.std)
    counts = torch.zeros(3, dtype=torch.float64)  # videos, top-1 hits, top-5 hits
    predictions = []
    for index in tqdm(range(ctx.rank, len(dataset), ctx.world), disable=not ctx.main or args.quiet, desc="eval",
                      unit="video"):
        views, label = dataset[index]  # [clips * crops, 3, T, size, size]
        with autocast(ctx.device, args.bf16):
            logits = task.predict(model, views.to(ctx.device), args)
        scores = logits.float().softmax(-1).sum(0)
        top = scores.topk(min(5, scores.numel())).indices.tolist()
        counts += torch.tensor([1.0, float(top[0] == label), float(label in top)], dtype=torch.float64)
        predictions.append({"index": index, "label": label, "top5": top, "scores": scores.tolist()})
    counts = ctx.sum(counts).cpu()
    result = {"videos": int(counts[0]), "top1": float(counts[1] / counts[0]), "top5": float(counts[2] / counts[0]),
              "views": args.num_clips * args.num_crops, "frames": frames, "size": size, "rlt": bool(args.rlt),
              "budget": args.budget, "sampling": args.sampling, "settings": settings}
    if ctx.main:
        print(json.dumps(result))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "eval.json").write_text(json.dumps({**result, "predictions": predictions}, indent=1))
    ctx.close()
    return result
