"""Training beyond one process: gradient accumulation, FSDP2, activation checkpointing, DCP checkpoints that
reshard, export. Multi-process runs go through ``torchrun`` (gloo on the CPU) on tiny models and the real sample
clips; each is compared with a single-process run of the same global batch.

Tolerance: float32 runs on different splits of the same global batch differ only in reduction order (batch-size
dependent matmul blocking, the all-reduce's sum order): about 1e-7 relative per step here; losses are compared at
1e-5 absolute (losses near log(4) = 1.39), as tests/test_train.py does for DDP.
"""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyvidfast.models import create_model
from pyvidfast.train.__main__ import main as train_main
from pyvidfast.train.__main__ import parse_args
from pyvidfast.train.checkpoint import CheckpointError, latest_sharded, read_sharded
from pyvidfast.train.data import StepSampler, collate
from pyvidfast.train.distributed import block_units, checkpoint_activations
from pyvidfast.train.loop import read_metrics
from pyvidfast.train.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
LOSS_TOLERANCE = 1e-5
TINY_VIT = {"img_size": 32, "num_frames": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 4}
TINY_FLUX = {"embed_dim": 32, "depth": 2, "num_heads": 2, "attn_pool_num_heads": 2, "clip_embed_dim": 32,
             "img_size": 28, "num_frames": 4, "num_classes": 4}
# 4 or 9 tokens per frame, 2 or 4 frames: 8 to 36 tokens; the heads keep 24, 16 and 8.
FLUX = ["--flux", "--flexi-frames", "2", "4", "--flexi-resolutions", "28", "42", "--min-tokens", "0",
        "--max-tokens", "100", "--budgets", "24", "16", "8"]


def vit_args(video_list, out, *extra):
    return ["finetune", "--list", str(video_list), "--out", str(out), "--batch-size", "4", "--stride", "1",
            "--workers", "0", "--quiet", "--lr", "1e-3", "--model", "videomae_vit_small_patch16_224",
            "--model-kwargs", json.dumps(TINY_VIT), *extra]


def flux_args(video_list, out, *extra):
    return ["finetune", "--list", str(video_list), "--out", str(out), "--batch-size", "4", "--stride", "1",
            "--workers", "0", "--quiet", "--lr", "1e-3", "--model", "fluxvit_small_patch14",
            "--model-kwargs", json.dumps(TINY_FLUX), *FLUX, *extra]


def torchrun(nproc: int, argv: list[str], *launcher: str, env: dict | None = None,
             check: bool = True) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone`` of ``python -m pyvidfast.train argv``; its stderr goes into
    the failure message."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *launcher,
           "-m", "pyvidfast.train", *argv]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(cmd, env=environment, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, f"torchrun failed ({result.returncode}):\n{result.stderr[-6000:]}"
    return result


def losses(out) -> list[float]:
    """The loss of each step, the last record of a step winning (a restarted run logs some steps twice)."""
    by_step = {record["step"]: record["loss"] for record in read_metrics(out)}
    return [by_step[step] for step in sorted(by_step)]


def test_step_sampler_split_does_not_change_the_step():
    """The samples of a step and their seeds are the same whatever the ranks x micro-batches split."""
    def step_items(world, accum):
        micro = [list(StepSampler(12, 4, r, world, seed=5, start_step=0, total_steps=3, accum_steps=accum))
                 for r in range(world)]
        return [sorted(item for r in range(world) for item in sum(micro[r][s * accum:(s + 1) * accum], []))
                for s in range(3)]

    reference = step_items(1, 1)
    for world, accum in [(1, 4), (2, 2), (4, 1), (2, 1), (1, 2)]:
        assert step_items(world, accum) == reference, (world, accum)
    assert len(StepSampler(12, 4, 0, 2, 5, 0, 3, accum_steps=2)) == 6
    with pytest.raises(ValueError, match="accumulation"):
        StepSampler(12, 4, 0, 2, 5, 0, 3, accum_steps=4)


def test_accumulation_split_gives_the_same_losses(video_list, tmp_path):
    """world 1 x accum 4 == world 1 x accum 1 == world 2 x accum 2 == world 4 x accum 1 (DDP), float32."""
    train_main(vit_args(video_list, tmp_path / "w1a1", "--steps", "3"))
    train_main(vit_args(video_list, tmp_path / "w1a4", "--steps", "3", "--accum-steps", "4"))
    torchrun(2, vit_args(video_list, tmp_path / "w2a2", "--steps", "3", "--accum-steps", "2"))
    torchrun(4, vit_args(video_list, tmp_path / "w4a1", "--steps", "3"))
    reference = losses(tmp_path / "w1a1")
    assert len(reference) == 3
    for run in ("w1a4", "w2a2", "w4a1"):
        assert losses(tmp_path / run) == pytest.approx(reference, abs=LOSS_TOLERANCE), run
    a = torch.load(tmp_path / "w1a4" / "checkpoint.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "w2a2" / "checkpoint.pth", weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)
    record = read_metrics(tmp_path / "w2a2")[-1]
    assert record["clips_per_s"] > 0 and record["tokens_per_s"] == pytest.approx(record["clips_per_s"] * 8)  # 2 x 2 x 2 tokens a clip
    assert record["max_memory_mb"] > 0 and record["data_s"] >= 0


def test_fsdp_videomae_matches_one_process_resumes_resharded_and_exports(video_list, tmp_path):
    """FSDP2 at 2 ranks (steps 1-2, sharded checkpoint) -> resumed at 1 rank and at 4 ranks (steps 3-4): the loss
    sequence of one uninterrupted single-process run; export loads strict into create_model."""
    train_main(vit_args(video_list, tmp_path / "one", "--steps", "4"))
    reference = losses(tmp_path / "one")
    torchrun(2, vit_args(video_list, tmp_path / "w2", "--steps", "4", "--stop-at", "2", "--fsdp"))
    assert losses(tmp_path / "w2") == pytest.approx(reference[:2], abs=LOSS_TOLERANCE)
    saved = latest_sharded(tmp_path / "w2")
    assert saved.name == "step_00000002" and sorted(p.name for p in saved.parent.iterdir()) == [saved.name]
    for world in (1, 4):
        out = tmp_path / f"w2_to_w{world}"
        shutil.copytree(tmp_path / "w2", out)
        argv = vit_args(video_list, out, "--steps", "4", "--fsdp", "--resume", "auto")
        if world == 1:
            train_main(argv)
        else:
            torchrun(world, argv)
        assert losses(out) == pytest.approx(reference, abs=LOSS_TOLERANCE), world

    exported = tmp_path / "vit.safetensors"
    train_main(["export", "--checkpoint", str(tmp_path / "w2_to_w1"), "--out", str(exported)])
    model = create_model("videomae_vit_small_patch16_224", pretrained=str(exported), **TINY_VIT)
    expected = torch.load(tmp_path / "one" / "checkpoint.pth", weights_only=True)["model"]
    state = model.state_dict()
    assert set(state) == set(expected)
    for key in expected:
        torch.testing.assert_close(state[key], expected[key], atol=1e-5, rtol=1e-4)
    # A .pth export is the same tensors.
    train_main(["export", "--checkpoint", str(latest_sharded(tmp_path / "w2_to_w1")), "--out",
                str(tmp_path / "vit.pth")])
    from_pth = torch.load(tmp_path / "vit.pth", weights_only=True)
    assert all(torch.equal(from_pth[k], state[k]) for k in state)


def test_fsdp_fluxvit_with_activation_checkpointing_and_accumulation(video_list, tmp_path):
    """FluxViT (three budgets per step, so each block runs three times): FSDP2 at 2 ranks, blocks resharded after
    forward, activations recomputed, 2 micro-batches per rank == one plain process."""
    train_main(flux_args(video_list, tmp_path / "one", "--steps", "3"))
    torchrun(2, flux_args(video_list, tmp_path / "fsdp", "--steps", "3", "--fsdp", "--fsdp-reshard-after-forward",
                          "--activation-checkpointing", "--accum-steps", "2"))
    assert losses(tmp_path / "fsdp") == pytest.approx(losses(tmp_path / "one"), abs=LOSS_TOLERANCE)
    weights, extra = read_sharded(latest_sharded(tmp_path / "fsdp"))
    expected = torch.load(tmp_path / "one" / "checkpoint.pth", weights_only=True)["model"]
    assert set(weights) == set(expected) and extra["step"] == 3 and len(extra["rng"]) == 2
    # The pooling's key biases (and the norms before them) have a gradient of exactly zero in exact arithmetic
    # (a bias shared by all keys cancels in the softmax): float noise of ~1e-9 that AdamW's normalization turns
    # into steps of up to lr = 1e-3, differently for each reduction order. Those are compared at 1e-4.
    for key in expected:
        noise_only = "clip_projector" in key and key.endswith(("k_bias", "norm1_k.bias"))
        torch.testing.assert_close(weights[key], expected[key], atol=1e-4 if noise_only else 1e-5, rtol=1e-4,
                                   msg=key)


# bfloat16 parameters in compute (8 mantissa bits): over 3 steps the tiny model's losses stay within 0.01 of
# float32 (as BF16_LOSS_TOLERANCE in tests/test_train.py).
BF16_LOSS_TOLERANCE = 0.01


def test_fsdp_bf16_mixed_precision_single_process(video_list, tmp_path):
    train_main(vit_args(video_list, tmp_path / "fp32", "--steps", "3"))
    train_main(vit_args(video_list, tmp_path / "mp", "--steps", "3", "--fsdp", "--fsdp-mp", "bf16"))
    fp32, mixed = losses(tmp_path / "fp32"), losses(tmp_path / "mp")
    assert mixed == pytest.approx(fp32, abs=BF16_LOSS_TOLERANCE) and mixed != fp32
    weights, _ = read_sharded(latest_sharded(tmp_path / "mp"))
    assert {w.dtype for w in weights.values()} == {torch.float32}  # the sharded parameters stay float32


def grads_of(task, batch, seed=7):
    torch.manual_seed(seed)  # drop path draws from the global RNG
    task.zero_grad(set_to_none=True)
    loss, _ = task(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in task.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["videomae", "fluxvit"])
def test_activation_checkpointing_gives_the_same_gradients(video_list, tmp_path, family):
    kwargs = {**(TINY_VIT if family == "videomae" else TINY_FLUX), "drop_path_rate": 0.3}
    make = vit_args if family == "videomae" else flux_args
    argv = make(video_list, tmp_path, "--steps", "1")
    argv[argv.index("--model-kwargs") + 1] = json.dumps(kwargs)
    args = parse_args(argv)
    task = get_task("flux_finetune" if family == "fluxvit" else "finetune").build(args).train()
    batch = collate([task.dataset[(i, 1000 + i)] for i in range(2)])
    checkpointed = copy.deepcopy(task)
    assert checkpoint_activations(checkpointed.model) == 2
    calls = []
    for block in block_units(checkpointed.model):
        block.attn.register_forward_hook(lambda *_: calls.append(1))
    loss, grads = grads_of(task, batch)
    loss_ckpt, grads_ckpt = grads_of(checkpointed, batch)
    assert len(calls) == 2 * 2 * (3 if family == "fluxvit" else 1)  # every block's forward ran again in backward
    assert torch.equal(loss, loss_ckpt) and set(grads) == set(grads_ckpt)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-6, atol=1e-7, msg=name)
    assert set(checkpointed.state_dict()) == set(task.state_dict())  # checkpoint names unchanged


def test_activation_memory_sees_what_checkpointing_keeps(video_list):
    """bench.train_memory's allocator count (torch.profiler memory events) on a tiny ViT at depth 2 and 4: each
    block adds its full activations without checkpointing (about 16 tensors of the block input's size: norms, qkv,
    attention, MLP hidden) and exactly its input plus the saved RNG state with it."""
    from bench.train_memory import activation_memory, finetune_task

    cpu = torch.device("cpu")
    saved = {}
    for depth in (2, 4):
        kwargs = {**TINY_VIT, "img_size": 64, "embed_dim": 64, "depth": depth}  # 32 tokens a clip
        task = finetune_task("videomae_vit_small_patch16_224", kwargs, video_list, cpu)
        batch = collate([task.dataset[(i, 1000 + i)] for i in range(2)])
        plain = activation_memory(task, batch, cpu)
        checkpoint_activations(task.model)
        checkpointed = activation_memory(task, batch, cpu)
        assert plain["grad_mb"] == checkpointed["grad_mb"] > 0
        assert checkpointed["peak_mb"] <= plain["peak_mb"]
        saved[depth] = plain["saved_mb"] * 2**20, checkpointed["saved_mb"] * 2**20
    block_input = 2 * 32 * 64 * 4  # [B, N, D] float32
    per_block_plain = (saved[4][0] - saved[2][0]) / 2
    per_block_checkpointed = (saved[4][1] - saved[2][1]) / 2
    assert per_block_checkpointed == block_input + torch.get_rng_state().numel()
    assert 12 * block_input < per_block_plain < 20 * block_input, per_block_plain / block_input
    assert saved[4][0] > 3 * saved[4][1] and saved[4][0] > 1.8 * saved[2][0]


def test_units_of_every_family():
    with torch.device("meta"):
        vit = create_model("videomae_vit_small_patch16_224", **TINY_VIT)
        pretrain = create_model("pretrain_videomae_small_patch16_224", img_size=32, num_frames=4, encoder_embed_dim=32,
                                encoder_depth=2, encoder_num_heads=2, decoder_embed_dim=32, decoder_num_heads=2,
                                decoder_depth=1)
        flux = create_model("fluxvit_small_patch14", **TINY_FLUX)
        uniformer = create_model("uniformerv2_base_patch16_224", num_frames=4)
    assert block_units(vit) == list(vit.blocks)
    assert block_units(pretrain) == [*pretrain.encoder.blocks, *pretrain.decoder.blocks]
    wrapper = torch.nn.Module()
    wrapper.backbone = flux
    assert block_units(wrapper) == list(flux.blocks)
    assert block_units(uniformer) == list(uniformer.transformer.resblocks)

    class Custom(torch.nn.Module):  # a model that names its own units
        def __init__(self):
            super().__init__()
            self.tower, self.layers = torch.nn.Linear(2, 2), torch.nn.ModuleList([torch.nn.Linear(2, 2)])

        def fsdp_units(self):
            return [self.tower]

    custom = Custom()
    assert block_units(custom) == [custom.tower]
    with pytest.raises(ValueError, match="no blocks"):
        checkpoint_activations(torch.nn.Linear(2, 2))


def test_export_rejects_bad_paths(tmp_path):
    with pytest.raises(ValueError, match=r"--out: expected a \.safetensors or \.pth"):
        train_main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "model.bin")])
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        train_main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "model.pth")])
    (tmp_path / "checkpoints" / "step_00000003").mkdir(parents=True)  # a folder DCP never finished
    with pytest.raises(FileNotFoundError, match="holds no complete checkpoint"):
        train_main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "model.pth")])
    with pytest.raises(CheckpointError, match=r"\.metadata is missing"):
        train_main(["export", "--checkpoint", str(tmp_path / "checkpoints" / "step_00000003"), "--out",
                    str(tmp_path / "model.pth")])


def test_context_close_passes_a_barrier_before_leaving_the_group(monkeypatch):
    """Issue 15 (a rank aborted once at exit): no rank destroys its process group while a peer may still be in
    the last collective, so close() is a barrier, then destroy_process_group (a one-process gloo group here)."""
    import torch.distributed as dist

    from pyvidfast.train.distributed import Context

    for name in ("MASTER_ADDR", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    calls = []
    for name in ("barrier", "destroy_process_group"):
        original = getattr(dist, name)
        monkeypatch.setattr(dist, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    ctx = Context("cpu", distributed=True)
    assert ctx.grouped and dist.get_backend() == "gloo"
    ctx.close()
    assert calls == ["barrier", "destroy_process_group"] and not dist.is_initialized()
    ctx.close()  # a second close is a no-op
    assert calls == ["barrier", "destroy_process_group"]
