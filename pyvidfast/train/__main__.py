"""Command line of the training scripts.

    python -m pyvidfast.train pretrain --list train.txt --out runs/pt --steps 1000 --batch-size 32
    python -m pyvidfast.train finetune --list train.txt --out runs/ft --init runs/pt/checkpoint.pth --rlt
    python -m pyvidfast.train eval --list val.txt --checkpoint runs/ft/checkpoint.pth --num-clips 5 --num-crops 3
    python -m pyvidfast.train finetune --list train.txt --out runs/uv2 --model uniformerv2_base_patch16_224 \
        --clip-weights ViT-B-16.pt [--frozen]     # lr, drop path, sampling, eval views: the model's recipe
    python -m pyvidfast.train distill --list train.txt --out runs/flux_pt --model fluxvit_small_patch14 \
        --teacher videomae_vit_base_patch16_224 --teacher-checkpoint vit_b_k710.pth
    python -m pyvidfast.train finetune --flux --list train.txt --out runs/flux_ft --model fluxvit_small_patch14 \
        --init runs/flux_pt/checkpoint.pth
    torchrun --nproc_per_node 8 -m pyvidfast.train finetune ...   # DDP: NCCL on GPUs, gloo on CPU
    torchrun --nproc_per_node 8 -m pyvidfast.train pretrain ... --fsdp --activation-checkpointing --accum-steps 4
    python -m pyvidfast.train export --checkpoint runs/pt --out vit_g_pt.safetensors

The list file holds ``path [label]`` lines (label unused by ``pretrain``); relative paths start at its folder.
Clip length, size and normalization come from the model's ``data_config`` (``--model-kwargs '{"num_frames": 16,
"img_size": 224}'``), except for the Flux commands (``finetune --flux``, ``distill``), which draw length and size
per step (flexi-sampling, see ``pyvidfast.train.tasks.fluxvit``). Each command runs one task of
``pyvidfast.train.tasks`` (``finetune --flux`` runs ``flux_finetune``); see docs/training.md. Settings left out
(lr, weight decay, betas, warm-up, drop path, ``--sampling``, eval views) come from the model's published recipe
(``model.recipe``) when it has one, else from the defaults listed in ``--help``; the run prints what it used.
"""

import argparse

from pyvidfast.train import checkpoint, evaluate, loop
from pyvidfast.train.data import BAD_SAMPLE_POLICIES, SAMPLINGS
from pyvidfast.train.tasks import videoxl


def _common(parser: argparse.ArgumentParser, model: str) -> None:
    parser.add_argument("--list", required=True, help="video list file: 'path [label]' per line")
    parser.add_argument("--model", default=model, help="registered model name (pyvidfast.models.list_models())")
    parser.add_argument("--model-kwargs", default="", help="JSON of constructor overrides, e.g. '{\"depth\": 2}'")
    parser.add_argument("--stride", type=int, default=4, help="take every stride-th frame")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sampling", choices=SAMPLINGS, default=None,
                        help="dense: frames --stride apart; segments: one frame per equal part of the video "
                             "(default: the model's recipe, else dense)")


def _frozen(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frozen", action="store_true",
                        help="frozen backbone (models that take frozen: UniFormerV2; its frozen layout has no "
                             "'balance' weight, so evaluate such a run with --frozen too)")


def _training(parser: argparse.ArgumentParser, lr: float, weight_decay: float, betas: tuple[float, float]) -> None:
    parser.add_argument("--out", required=True, help="folder for checkpoint.pth and metrics.jsonl")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps of the whole schedule")
    parser.add_argument("--stop-at", type=int, default=0, help="stop after this step (the schedule still spans --steps)")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (split evenly across ranks)")
    # Default None: the model's recipe fills them in when it has one, else the fallbacks (pyvidfast.train.recipe).
    parser.add_argument("--lr", type=float, default=None, help=f"default: the model's recipe, else {lr}")
    parser.add_argument("--min-lr", type=float, default=None, help="default: the model's recipe, else 1e-6")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="default: the recipe's share of warm-up epochs of --steps, else 0")
    parser.add_argument("--weight-decay", type=float, default=None,
                        help=f"default: the model's recipe, else {weight_decay}")
    parser.add_argument("--betas", type=float, nargs=2, default=None,
                        help=f"default: the model's recipe, else {betas[0]} {betas[1]}")
    parser.set_defaults(fallbacks={"lr": lr, "min_lr": 1e-6, "warmup_steps": 0, "weight_decay": weight_decay,
                                   "betas": list(betas), "sampling": "dense"})
    parser.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm (0: no clipping)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="data loader processes")
    parser.add_argument("--save-every", type=int, default=500, help="checkpoint every this many steps (and at the end)")
    parser.add_argument("--resume", default="",
                        help="a checkpoint (.pth file or --fsdp checkpoint folder) or a run folder, or 'auto' for "
                             "OUT's newest checkpoint if there is one")
    parser.add_argument("--on-bad-sample", choices=BAD_SAMPLE_POLICIES, default="fail",
                        help="a video that cannot be read: fail (the error names it) or skip (the next video of the "
                             "list takes its place; counted in metrics.jsonl, logged on stderr)")
    _scaling(parser)


def _scaling(parser: argparse.ArgumentParser) -> None:
    """Gradient accumulation, FSDP2 and activation checkpointing (docs/training.md, "Scaling")."""
    parser.add_argument("--accum-steps", type=int, default=1,
                        help="micro-batches per optimizer step (the global batch is split over ranks x this)")
    parser.add_argument("--fsdp", action="store_true",
                        help="FSDP2: parameters, gradients and optimizer states sharded over the ranks, per block "
                             "(default: DDP); checkpoints are sharded DCP folders OUT/checkpoints/step_*")
    parser.add_argument("--fsdp-reshard-after-forward", action="store_true",
                        help="--fsdp: free each block's gathered parameters after its forward (less memory, one "
                             "more all-gather per block)")
    parser.add_argument("--fsdp-mp", choices=["bf16"], default="",
                        help="--fsdp: bfloat16 parameters in compute, float32 gradient reduction and optimizer "
                             "(implies --bf16 autocast for the ops between blocks)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute each block's activations in the backward pass (less memory, more compute)")


def _flexi(parser: argparse.ArgumentParser) -> None:
    """Flexi-sampling: per step a (frames, resolution) pair whose token count T * (R / 14)^2 lies in the range."""
    parser.add_argument("--flexi-frames", type=int, nargs="+", default=list(range(6, 26, 2)))
    parser.add_argument("--flexi-resolutions", type=int, nargs="+", default=list(range(112, 364, 28)))
    parser.add_argument("--min-tokens", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=6144)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pyvidfast.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    pretrain = sub.add_parser("pretrain", help="VideoMAE V2 dual-masking pretraining")
    _common(pretrain, "pretrain_videomae_base_patch16_224")
    _training(pretrain, lr=1.5e-4, weight_decay=0.05, betas=(0.9, 0.95))
    pretrain.add_argument("--mask-ratio", type=float, default=0.9, help="encoder tube-mask ratio")
    pretrain.add_argument("--decoder-mask-ratio", type=float, default=0.5,
                          help="decoder running-cell mask ratio (0: V1, decode every encoder-masked token)")

    finetune = sub.add_parser("finetune", help="classification fine-tuning (optionally on RLT-packed tokens)")
    _common(finetune, "videomae_vit_base_patch16_224")
    _training(finetune, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.999))
    finetune.add_argument("--init", default=None, help="checkpoint to start from (official, HF, or pretrain run)")
    finetune.add_argument("--clip-weights", default=None,
                          help="CLIP weights for the backbone (models that take clip_weights: UniFormerV2)")
    _frozen(finetune)
    finetune.add_argument("--drop-path", type=float, default=None,
                          help="drop path rate (drop_path_rate; default: the model's recipe, else the model's)")
    finetune.add_argument("--backbone-drop-path", type=float, default=None,
                          help="backbone drop path rate (backbone_drop_path_rate: UniFormerV2; default as --drop-path)")
    _sampling(finetune)
    finetune.add_argument("--layer-decay", type=float, default=0.75, help="layer-wise lr decay (1: none)")
    finetune.add_argument("--label-smoothing", type=float, default=0.0)
    finetune.add_argument("--mixup", type=float, default=0.0, help="mixup Beta alpha (0: off; the recipe uses 0.8)")
    finetune.add_argument("--cutmix", type=float, default=0.0, help="CutMix Beta alpha (0: off; the recipe uses 1.0)")
    finetune.add_argument("--rlt", action="store_true", help="train on RLT-packed tokens")
    finetune.add_argument("--flux", action="store_true",
                          help="FluxViT: flexi-sampling and the multi-budget loss (--model fluxvit_*)")
    finetune.add_argument("--budgets", type=int, nargs=3, default=[3072, 2048, 1024],
                          help="--flux: tokens kept for heads 0, 1, 2")
    _flexi(finetune)

    distill = sub.add_parser("distill", help="FluxViT double-mask distillation from a frozen VideoMAE V2 encoder "
                                             "(our reading of the paper)")
    _common(distill, "fluxvit_small_patch14")
    _training(distill, lr=5e-4, weight_decay=0.05, betas=(0.9, 0.98))
    distill.add_argument("--init", default=None, help="student checkpoint to start from")
    distill.add_argument("--budget", type=int, default=2048, help="student tokens kept per clip")
    _flexi(distill)
    distill.add_argument("--teacher", default="videomae_vit_base_patch16_224", help="VideoMAE V2 model name")
    distill.add_argument("--teacher-kwargs", default="", help="JSON of teacher constructor overrides")
    distill.add_argument("--teacher-checkpoint", default=None, help="teacher weights (default: random)")
    distill.add_argument("--teacher-resolutions", type=int, nargs="+", default=[160, 192, 224],
                         help="teacher input sizes, one drawn per step")
    distill.add_argument("--teacher-budget", type=int, default=1568, help="teacher tokens kept (fixed compute)")
    distill.add_argument("--student-layers", type=int, nargs="+", default=[5, 7, 9, 11])
    distill.add_argument("--teacher-layers", type=int, nargs="+", default=[5, 7, 9, 11])

    videoxl.add_parser(sub, _training)

    evaluation = sub.add_parser("eval", help="multi-view evaluation: top-1/top-5 of the softmax summed over views")
    _common(evaluation, "videomae_vit_base_patch16_224")
    evaluation.add_argument("--checkpoint", default=None, help="official, HF, or training-run checkpoint")
    evaluation.add_argument("--num-clips", type=int, default=None,
                            help="temporal clips per video (default: the model's recipe, else 5)")
    evaluation.add_argument("--num-crops", type=int, default=None,
                            help="spatial crops per clip (default: the model's recipe, else 3)")
    _sampling(evaluation)
    _frozen(evaluation)
    evaluation.set_defaults(fallbacks={"num_clips": 5, "num_crops": 3, "sampling": "dense"})
    evaluation.add_argument("--short-side", type=int, default=None,
                            help="resize the short side to this (default: the crop side)")
    evaluation.add_argument("--frames", type=int, default=None, help="frames per clip (default: the model's)")
    evaluation.add_argument("--size", type=int, default=None, help="crop side (default: the model's image size)")
    evaluation.add_argument("--rlt", action="store_true", help="evaluate on RLT-packed tokens (VideoMAE models)")
    evaluation.add_argument("--budget", type=int, default=None,
                            help="FluxViT models: tokens kept per clip, chosen by group_topk (default: all); "
                                 "without --frames/--size, the budget's token-optimized frames and size")
    evaluation.add_argument("--out", default="", help="folder for eval.json")

    export = sub.add_parser("export", help="a training checkpoint (--fsdp folder or .pth) -> one weights file in the "
                                           "model family's layout, loadable by create_model(pretrained=...)")
    export.add_argument("--checkpoint", required=True, help="a checkpoint folder or file, or a run folder (newest)")
    export.add_argument("--out", required=True, help="the .safetensors or .pth file to write")

    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.command == "eval":
        evaluate.evaluate(args)
    elif args.command == "export":
        print(f"wrote {checkpoint.export(args.checkpoint, args.out)}")
    else:
        loop.train(args, "flux_finetune" if getattr(args, "flux", False) else args.command)


if __name__ == "__main__":
    main()
