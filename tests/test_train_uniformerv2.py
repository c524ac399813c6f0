"""UniFormerV2 through the training command line: CLIP initialisation (--clip-weights), --frozen, the published
recipe as defaults, segment sampling and the 3 crops x 4 clips evaluation."""

import json
import math

import pytest
import torch

from pyvidfast.io import VideoReader, read_list_file, sampling
from pyvidfast.io.dataset import SegmentClips, short_side_size
from pyvidfast.models import create_model
from pyvidfast.models.uniformerv2 import RECIPES
from pyvidfast.train.__main__ import main as train_main
from pyvidfast.train.__main__ import parse_args
from pyvidfast.train.data import collate
from pyvidfast.train.loop import read_metrics, train_step
from pyvidfast.train.optim import make_optimizer
from pyvidfast.train.recipe import apply_recipe
from pyvidfast.train.tasks import get_task

MODEL = "uniformerv2_base_patch16_224"
# Shrunk like tests/test_uniformerv2.py (Kinetics layout: global blocks on the last 2 of 4 layers), 4 frames.
TINY = dict(img_size=16, patch_size=4, width=24, layers=4, heads=4, num_classes=4, num_frames=4, return_list=[2, 3])
FROZEN_PREFIXES = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer.resblocks")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny random Hugging Face CLIPVisionModel of the model's width and depth, saved with save_pretrained."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(hidden_size=24, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                              image_size=16, patch_size=4, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    torch.manual_seed(5)
    model = CLIPVisionModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("clip") / "vision"
    model.save_pretrained(folder)
    return folder


def finetune_argv(video_list, out, clip_folder, *extra, kwargs=TINY):
    return ["finetune", "--list", str(video_list), "--out", str(out), "--batch-size", "4", "--workers", "0",
            "--quiet", "--model", MODEL, "--model-kwargs", json.dumps(kwargs), "--clip-weights", str(clip_folder),
            "--frozen", *extra]


def test_finetune_frozen_from_clip_with_recipe_defaults(video_list, clip_folder, tmp_path):
    train_main(finetune_argv(video_list, tmp_path, clip_folder, "--steps", "3"))
    recipe = RECIPES["kinetics"]
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["lr"] == {"value": recipe["lr"], "from": "model.recipe"}
    assert settings["weight_decay"] == {"value": 0.05, "from": "model.recipe"}
    assert settings["drop_path"] == {"value": recipe["drop_path_rate"], "from": "model.recipe"}
    assert settings["backbone_drop_path"] == {"value": recipe["backbone_drop_path_rate"], "from": "model.recipe"}
    assert settings["sampling"] == {"value": "segments", "from": "model.recipe"}
    records = read_metrics(tmp_path)
    assert len(records) == 3 and all(math.isfinite(r["loss"]) for r in records)
    assert records[0]["lr"] == pytest.approx(recipe["lr"])  # no warm-up step in a 3-step run (5/55 of 3 rounds to 0)
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)["model"]
    torch.manual_seed(0)  # the loop's seed: the same initialisation as the run's
    start = create_model(MODEL, clip_weights=str(clip_folder), frozen=True, **TINY).state_dict()
    frozen = [k for k in start if k.startswith(FROZEN_PREFIXES)]
    assert frozen and all(torch.equal(checkpoint[k], start[k]) for k in frozen)  # CLIP part untouched
    assert not torch.equal(checkpoint["transformer.proj.2.weight"], start["transformer.proj.2.weight"])  # head trained
    # A flag the user gives wins over the recipe.
    args = parse_args(finetune_argv(video_list, tmp_path, clip_folder, "--steps", "3", "--lr", "2e-3",
                                    "--sampling", "dense"))
    settings = apply_recipe(args)
    assert settings["lr"] == {"value": 2e-3, "from": "command line"} and args.sampling == "dense"


def test_frozen_loss_falls_on_a_fixed_batch(video_list, clip_folder, tmp_path):
    kwargs = {**TINY, "cls_dropout": 0.0, "mlp_dropout": [0.0, 0.0]}
    args = parse_args(finetune_argv(video_list, tmp_path, clip_folder, "--steps", "1", kwargs=kwargs))
    apply_recipe(args)
    task = get_task("finetune").build(args)
    assert task.dataset.sampling == "segments" and task.model.transformer.frozen
    batch = collate([task.dataset[(index, 1000 + index)] for index in range(4)])
    assert batch.video.shape == (4, 3, 4, 16, 16)
    optimizer = make_optimizer(task.model, 1e-2, weight_decay=0.0)
    trained = {n for g in optimizer.param_groups for n in g["names"]}
    assert trained and not any(n.startswith(FROZEN_PREFIXES) for n in trained)
    task.train()
    losses = [train_step(task, task.model, batch, optimizer)[0].item() for _ in range(6)]
    assert losses[-1] < 0.7 * losses[0], losses


def test_model_flags_the_model_does_not_take(video_list, clip_folder, tmp_path):
    videomae = json.dumps({"img_size": 64, "num_frames": 8, "embed_dim": 64, "depth": 2, "num_heads": 2,
                           "num_classes": 4})
    base = ["finetune", "--list", str(video_list), "--out", str(tmp_path), "--steps", "1", "--batch-size", "4",
            "--workers", "0", "--quiet", "--model", "videomae_vit_small_patch16_224", "--model-kwargs", videomae]
    with pytest.raises(ValueError, match="--frozen: model videomae_vit_small_patch16_224 does not take 'frozen'"):
        train_main(base + ["--frozen"])
    with pytest.raises(ValueError, match="--clip-weights: model videomae_vit_small_patch16_224 does not take"):
        train_main(base + ["--clip-weights", str(clip_folder)])
    # Without a recipe the command's own defaults apply: dense sampling, lr 1e-3.
    args = parse_args(base)
    settings = apply_recipe(args)
    assert settings["sampling"] == {"value": "dense", "from": "default"} and args.lr == 1e-3


def test_segment_views():
    assert sampling.segment_views(17, 4, 1) == [[2, 6, 10, 14]]  # segments of 4 frames, half-way in
    assert sampling.segment_views(17, 4, 4) == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert sampling.segment_views(3, 8, 2)[1][-1] <= 2  # short videos stay inside
    with pytest.raises(ValueError, match="num_views"):
        sampling.segment_views(10, 4, 0)


def test_segment_clips_sampler(video_list):
    with VideoReader(read_list_file(video_list)[0][0]) as reader:
        n = len(reader)
        middle = SegmentClips(4)(reader)
        drawn = [SegmentClips(4)(reader, generator=torch.Generator().manual_seed(seed)) for seed in range(8)]
        views = SegmentClips(4, num_clips=4)(reader)
    assert n == 16 and middle == [1, 5, 9, 13]  # the middle frame of each 4-frame segment
    for indices in drawn:  # one random frame inside each segment
        assert [i // 4 for i in indices] == [0, 1, 2, 3]
    assert len({tuple(d) for d in drawn}) > 1
    assert views == sampling.segment_views(16, 4, 4)


def test_eval_three_crops_four_clips_sums_softmax(video_list, clip_folder, tmp_path):
    train_main(finetune_argv(video_list, tmp_path, clip_folder, "--steps", "1"))
    checkpoint = tmp_path / "checkpoint.pth"
    train_main(["eval", "--list", str(video_list), "--checkpoint", str(checkpoint), "--quiet", "--out",
                str(tmp_path), "--model", MODEL, "--model-kwargs", json.dumps(TINY), "--frozen"])
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["views"] == 12 and result["sampling"] == "segments" and result["videos"] == 8
    assert result["settings"]["num_crops"] == {"value": 3, "from": "model.recipe"}
    assert result["settings"]["num_clips"] == {"value": 4, "from": "model.recipe"}
    # By hand for the first video: 4 interleaved segment samples x 3 crops along the long side of 16 x 21 frames.
    model = create_model(MODEL, pretrained=str(checkpoint), frozen=True, **TINY).eval()
    path = read_list_file(video_list)[0][0]
    with VideoReader(path) as reader:
        size = short_side_size(reader.metadata.height, reader.metadata.width, 16)
        clips = [reader.get_frames(indices, size=size, layout="CTHW", dtype=torch.float32,
                                   mean=model.data_config.mean,
                                   std=model.data_config.std)
                 for indices in sampling.segment_views(len(reader), 4, 4)]
    assert size == (16, 21)
    views = torch.stack([clip[..., left:left + 16] for clip in clips for left in (0, 2, 5)])
    with torch.no_grad():
        want = model(views).softmax(-1).sum(0)
    torch.testing.assert_close(torch.tensor(result["predictions"][0]["scores"]), want, atol=1e-5, rtol=1e-5)
