"""Flux training through the training scripts: ``finetune --flux`` and ``distill`` on the real sample clips
(``video_list``: short real clips, 4 labels), and FluxViT's evaluation at a token budget."""

import json
import math

import torch

from pyvidfast.models import create_model
from pyvidfast.train.__main__ import main as train_main
from pyvidfast.train.loop import read_metrics
from pyvidfast.train.tasks.fluxvit import FlexiSampling, token_setting

TINY_FLUX = dict(embed_dim=64, depth=2, num_heads=4, attn_pool_num_heads=4, clip_embed_dim=32, img_size=56,
                 num_frames=8, num_classes=4)
TINY_TEACHER = dict(img_size=64, num_frames=8, embed_dim=48, depth=2, num_heads=2, num_classes=0)
# Tiny flexi ranges: 16, 36 or 64 tokens per frame; 100..300 tokens admits 6 of the 9 pairs.
FLEXI = ["--flexi-frames", "4", "6", "8", "--flexi-resolutions", "56", "84", "112", "--min-tokens", "100",
         "--max-tokens", "300"]
BUDGETS = (96, 64, 32)


def flux_args(command, video_list, out, *extra):
    return [command, "--list", str(video_list), "--out", str(out), "--batch-size", "4", "--stride", "1",
            "--workers", "0", "--quiet", "--model", "fluxvit_small_patch14", "--model-kwargs", json.dumps(TINY_FLUX),
            *FLEXI, *extra]


def mean(values):
    return sum(values) / len(values)


def test_flux_finetune(video_list, tmp_path):
    train_main(flux_args("finetune", video_list, tmp_path, "--flux", "--steps", "24", "--lr", "3e-3",
                         "--layer-decay", "0.9", "--budgets", *map(str, BUDGETS)))
    records = read_metrics(tmp_path)
    losses = [r["loss"] for r in records]
    assert len(losses) == 24 and all(math.isfinite(v) for v in losses)
    assert mean(losses[-4:]) < 0.7 * mean(losses[:4]), losses
    admissible = set(FlexiSampling((4, 6, 8), (56, 84, 112), 100, 300).settings())
    drawn = {(r["frames"], r["resolution"]) for r in records}
    assert drawn <= admissible and len(drawn) > 1, drawn
    for r in records:
        assert r["tokens"] == r["frames"] * (r["resolution"] // 14) ** 2
        assert r["kept"] == [min(b, r["tokens"]) for b in BUDGETS], r
    # The run's checkpoint loads strictly into a FluxViT.
    model = create_model("fluxvit_small_patch14", pretrained=str(tmp_path / "checkpoint.pth"), **TINY_FLUX)
    saved = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"]
    assert torch.equal(model.head[2].weight, saved["backbone.head.2.weight"])
    # ... and evaluates at a chosen clip shape and budget.
    train_main(["eval", "--list", str(video_list), "--checkpoint", str(tmp_path / "checkpoint.pth"), "--stride", "1",
                "--num-clips", "2", "--num-crops", "1", "--frames", "4", "--size", "84", "--budget", "40", "--quiet",
                "--out", str(tmp_path), "--model", "fluxvit_small_patch14", "--model-kwargs", json.dumps(TINY_FLUX)])
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["videos"] == 8 and result["views"] == 2 and (result["frames"], result["size"]) == (4, 84)
    assert result["budget"] == 40 and 0 <= result["top1"] <= result["top5"] == 1.0  # 4 classes: top 5 hold the label
    # Without --frames/--size, the budget picks the token-optimized clip shape.
    train_main(["eval", "--list", str(video_list), "--checkpoint", str(tmp_path / "checkpoint.pth"), "--stride", "1",
                "--num-clips", "1", "--num-crops", "1", "--budget", "100", "--quiet", "--out", str(tmp_path),
                "--model", "fluxvit_small_patch14", "--model-kwargs", json.dumps(TINY_FLUX)])
    result = json.loads((tmp_path / "eval.json").read_text())
    setting = token_setting(100)
    assert (result["frames"], result["size"]) == (setting.frames, setting.resolution) == (6, 112)


def test_flux_distill(video_list, tmp_path):
    train_main(flux_args("distill", video_list, tmp_path, "--steps", "10", "--lr", "3e-3", "--budget", "64",
                         "--teacher", "videomae_vit_small_patch16_224", "--teacher-kwargs", json.dumps(TINY_TEACHER),
                         "--teacher-resolutions", "32", "48", "--teacher-budget", "12", "--student-layers", "0", "1",
                         "--teacher-layers", "0", "1"))
    records = read_metrics(tmp_path)
    losses = [r["loss"] for r in records]
    assert len(losses) == 10 and all(0 <= v <= 2 for v in losses)
    assert mean(losses[-4:]) < 0.7 * mean(losses[:4]), losses
    assert {r["teacher_resolution"] for r in records} <= {32, 48}
    saved = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"]
    assert not any(k.startswith("teacher") for k in saved)  # the frozen teacher is not checkpointed
    assert saved["projectors.1.weight"].shape == (48, 64)
    # A distillation run initialises Flux fine-tuning (the projectors are dropped).
    student = create_model("fluxvit_small_patch14", pretrained=str(tmp_path / "checkpoint.pth"), **TINY_FLUX)
    assert torch.equal(student.blocks[1].mlp.fc2.weight, saved["backbone.blocks.1.mlp.fc2.weight"])


def test_flux_finetune_resume(video_list, tmp_path):
    """The step's flexi setting comes from its seed: a resumed run replays the uninterrupted one."""
    common = ("--flux", "--steps", "4", "--lr", "3e-3", "--budgets", *map(str, BUDGETS))
    train_main(flux_args("finetune", video_list, tmp_path / "whole", *common))
    train_main(flux_args("finetune", video_list, tmp_path / "parts", *common, "--stop-at", "2"))
    train_main(flux_args("finetune", video_list, tmp_path / "parts", *common, "--resume", "auto"))
    whole, parts = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "parts")
    assert [(r["frames"], r["resolution"]) for r in parts] == [(r["frames"], r["resolution"]) for r in whole]
    torch.testing.assert_close([r["loss"] for r in parts], [r["loss"] for r in whole], rtol=1e-5, atol=1e-6)
