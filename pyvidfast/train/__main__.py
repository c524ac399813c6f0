"""Command line of the training scripts.

    python -m pyvidfast.train pretrain --list train.txt --out runs/pt --steps 1000 --batch-size 32
    python -m pyvidfast.train finetune --list train.txt --out runs/ft --init runs/pt/checkpoint.pth --rlt
    python -m pyvidfast.train eval --list val.txt --checkpoint runs/ft/checkpoint.pth --num-clips 5 --num-crops 3
    torchrun --nproc_per_node 8 -m pyvidfast.train finetune ...   # DDP: NCCL on GPUs, gloo on CPU

The list file holds ``path label`` lines (label unused by ``pretrain``); relative paths start at its folder.
Clip length and size come from the model (``--model-kwargs '{"num_frames": 16, "img_size": 224}'``).
"""

import argparse

from pyvidfast.train import loop


def _common(parser: argparse.ArgumentParser, model: str) -> None:
    parser.add_argument("--list", required=True, help="video list file: 'path label' per line")
    parser.add_argument("--model", default=model, help="registered model name (pyvidfast.models.list_models())")
    parser.add_argument("--model-kwargs", default="", help="JSON of constructor overrides, e.g. '{\"depth\": 2}'")
    parser.add_argument("--stride", type=int, default=4, help="take every stride-th frame")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _training(parser: argparse.ArgumentParser, lr: float, weight_decay: float, betas: tuple[float, float]) -> None:
    parser.add_argument("--out", required=True, help="folder for checkpoint.pth and metrics.jsonl")
    parser.add_argument("--steps", type=int, required=True, help="optimizer steps of the whole schedule")
    parser.add_argument("--stop-at", type=int, default=0, help="stop after this step (the schedule still spans --steps)")
    parser.add_argument("--batch-size", type=int, default=8, help="global batch (split evenly across ranks)")
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--min-lr", type=float, default=1e-6)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--weight-decay", type=float, default=weight_decay)
    parser.add_argument("--betas", type=float, nargs=2, default=betas)
    parser.add_argument("--clip-grad", type=float, default=0.0, help="max gradient norm (0: no clipping)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="data loader processes")
    parser.add_argument("--save-every", type=int, default=500, help="checkpoint every this many steps (and at the end)")
    parser.add_argument("--resume", default="", help="checkpoint path, or 'auto' for OUT/checkpoint.pth if present")


def main(argv=None) -> None:
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
    finetune.add_argument("--layer-decay", type=float, default=0.75, help="layer-wise lr decay (1: none)")
    finetune.add_argument("--label-smoothing", type=float, default=0.0)
    finetune.add_argument("--mixup", type=float, default=0.0, help="mixup Beta alpha (0: off; the recipe uses 0.8)")
    finetune.add_argument("--cutmix", type=float, default=0.0, help="CutMix Beta alpha (0: off; the recipe uses 1.0)")
    finetune.add_argument("--rlt", action="store_true", help="train on RLT-packed tokens")

    evaluate = sub.add_parser("eval", help="multi-view evaluation: top-1/top-5 of softmax averaged over views")
    _common(evaluate, "videomae_vit_base_patch16_224")
    evaluate.add_argument("--checkpoint", default=None, help="official, HF, or training-run checkpoint")
    evaluate.add_argument("--num-clips", type=int, default=5, help="temporal clips per video")
    evaluate.add_argument("--num-crops", type=int, default=3, help="spatial crops per clip")
    evaluate.add_argument("--short-side", type=int, default=None, help="resize the short side to this (default: crop)")
    evaluate.add_argument("--rlt", action="store_true", help="evaluate on RLT-packed tokens")
    evaluate.add_argument("--out", default="", help="folder for eval.json")

    args = parser.parse_args(argv)
    if args.command == "eval":
        loop.evaluate(args)
    else:
        loop.train(args, args.command)


if __name__ == "__main__":
    main()
