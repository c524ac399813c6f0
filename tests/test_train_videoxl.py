"""Video-XL fine-tuning (``python -m pyvidfast.train videoxl-sft``) on a tiny Qwen2 + CLIP written by the test:
label masking token by token, the official loss normalization against an independent computation, trainable
sets per stage, ratio replay on resume, activation checkpointing, and a few steps lowering the loss."""

import copy
import json

import numpy as np
import pytest
import torch
from test_videoxl import one_thread, official_state, randomize, tiny_configs, tiny_tokenizer, write_folder  # noqa: F401

from pyvidfast.models.videoxl import IMAGE_TOKEN_INDEX, VideoXL
from pyvidfast.train.loop import read_metrics
from pyvidfast.train.tasks.videoxl import (VideoXLSFT, parse_ratio_schedule, ratios_at, set_trainable,
                                           sft_loss)
from pyvidfast.videoxl.data import (IGNORE_INDEX, SFTSample, StrideGroupedSampler, encode_conversation,
                                    read_samples, training_frame_indices)

TURNS = [{"from": "human", "value": "<image>\nWhat happens ?"}, {"from": "gpt", "value": "the ball"},
         {"from": "human", "value": "What ?"}, {"from": "gpt", "value": "bikes"}]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize(VideoXL(*tiny_configs()).double())


def test_label_masking_token_by_token(tokenizer):
    ids, labels = encode_conversation(tokenizer, TURNS)
    words = ("<|im_start|> system You are a helpful assistant . <|im_end|> "
             "<|im_start|> user IMAGE What happens ? <|im_end|> <|im_start|> assistant the ball <|im_end|> "
             "<|im_start|> user What ? <|im_end|> <|im_start|> assistant bikes <|im_end|>").split()
    want_ids = [IMAGE_TOKEN_INDEX if w == "IMAGE" else tokenizer.convert_tokens_to_ids(w) for w in words]
    assert ids.tolist() == want_ids
    # labelled: each answer's words and the <|im_end|> that closes it; nothing else
    answer_positions = {18, 19, 20, 28, 29}
    assert [words[i] for i in sorted(answer_positions)] == ["the", "ball", "<|im_end|>", "bikes", "<|im_end|>"]
    for i, (token, label) in enumerate(zip(ids.tolist(), labels.tolist())):
        assert label == (token if i in answer_positions else IGNORE_INDEX), (i, words[i])


def test_read_samples_checks(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"video": "a.mp4", "conversations": TURNS}) + "\n"
                    + json.dumps({"conversations": [{"from": "human", "value": "hi"},
                                                    {"from": "gpt", "value": "the"}]}) + "\n")
    assert len(read_samples(good)) == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"video": "a.mp4", "conversations": [{"from": "human", "value": "no placeholder"},
                                                                    {"from": "gpt", "value": "x"}]}]))
    with pytest.raises(ValueError, match="<image> placeholder"):
        read_samples(bad)
    bad.write_text(json.dumps([{"conversations": [{"from": "robot", "value": "x"}]}]))
    with pytest.raises(ValueError, match="human"):
        read_samples(bad)


def test_training_frame_indices():
    # 50 s at 25 fps: one frame per second (every 25th)
    assert training_frame_indices(1250, 25.0, 128) == list(range(0, 1250, 25))
    # 300 s: 128 frames spread over the whole video, as np.linspace(..., dtype=int)
    many = training_frame_indices(7500, 25.0, 128)
    assert many == np.linspace(0, 7499, 128, dtype=int).tolist() and many[0] == 0 and many[-1] == 7499
    assert training_frame_indices(30, 10.0, 128, video_fps=10.0) == list(range(30))


def sample(model, tokenizer, frames, answer, seed):
    turns = [{"from": "human", "value": "<image>\nWhat happens ?"}, {"from": "gpt", "value": answer}]
    ids, labels = encode_conversation(tokenizer, turns)
    g = torch.Generator().manual_seed(seed)
    return SFTSample(torch.randn(frames, 3, 56, 56, generator=g, dtype=torch.float64), "video", ids, labels, seed)


def test_loss_normalization_against_independent_computation(model, tokenizer):
    samples = [sample(model, tokenizer, 26, "the ball bikes the ball", 1), sample(model, tokenizer, 7, "bikes", 2)]
    loss, info = sft_loss(model, samples, 4, torch.Generator().manual_seed(0))
    loss = loss.detach()
    assert info["answer_tokens"] == 6 + 2 and info["frames"] == 33 and info["ratios"] == [[4, 4, 4], [4]]
    total, count, per_sample = 0.0, 0, []
    with torch.no_grad():
        for s in samples:  # each alone, its own log-softmax at each labelled next token
            logits = model.prefill([s.input_ids], [s.pixels], ratio=4).logits[0]
            targets = s.labels[1:]
            rows = (targets != IGNORE_INDEX).nonzero().flatten()
            nll = -torch.log_softmax(logits[rows], -1)[torch.arange(len(rows)), targets[rows]]
            total, count = total + float(nll.sum()), count + len(rows)
            per_sample.append(float(nll.mean()))
    assert abs(float(loss) - total / count) < 1e-10
    # the official normalization: one count over the whole batch, not a mean of per-sample means
    assert abs(float(loss) - sum(per_sample) / 2) > 1e-3


def test_trainable_sets_per_stage(model, tokenizer):
    m = copy.deepcopy(model)
    set_trainable(m, "projector")
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        "model.mm_projector.0.weight", "model.mm_projector.0.bias", "model.mm_projector.2.weight",
        "model.mm_projector.2.bias"}
    samples = [sample(m, tokenizer, 14, "the ball", 3)]
    loss, info = sft_loss(m, samples, 4, torch.Generator(), compress=False)  # stage 1: the plain LLaVA path
    assert info["windows"] == 0
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.model.mm_projector.parameters())
    assert all(p.grad is None for n, p in m.named_parameters() if not n.startswith("model.mm_projector."))
    set_trainable(m, "full")
    frozen = {n for n, p in m.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in m.named_parameters() if n.startswith("model.vision_tower.")} and frozen
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "model.beacon_embed_tokens.weight" in trainable and "lm_head.weight" in trainable
    assert "model.layers.1.self_attn.beacon_v_proj.weight" in trainable and "model.embed_tokens.weight" in trainable
    set_trainable(m, "full", unfreeze_vision=True)
    assert all(p.requires_grad for p in m.parameters())


def test_plain_path_is_one_causal_pass(model, tokenizer):
    """compress=False (stage 1) equals HF-style full attention: the video's tokens as ordinary text rows."""
    s = sample(model, tokenizer, 14, "the ball", 4)
    with torch.no_grad():
        plain = model.prefill([s.input_ids], [s.pixels], compress=False)
        feats = model.encode_frames(s.pixels)
        where = int((s.input_ids == IMAGE_TOKEN_INDEX).nonzero())
        embeds = torch.cat([model.model.embed_tokens(s.input_ids[:where]), feats,
                            model.model.embed_tokens(s.input_ids[where + 1:])])
        reference = model.lm_head(model.model(inputs_embeds=embeds[None]).last_hidden_state[0])
    keep = list(range(where)) + [where + len(feats) - 1] + list(range(where + len(feats), len(embeds)))
    assert (plain.logits[0] - reference[keep]).abs().max() < 1e-10
    assert plain.memory.vst == [0]


def test_activation_checkpointing_same_gradients(model, tokenizer):
    samples = [sample(model, tokenizer, 20, "the ball", 5), sample(model, tokenizer, 9, "bikes", 6)]
    grads = []
    for checkpointing in (False, True):
        m = copy.deepcopy(model).train()
        if checkpointing:
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        loss, _ = sft_loss(m, samples, [2, 4], torch.Generator().manual_seed(3))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    assert max((grads[0][n] - grads[1][n]).abs().max() for n in grads[0]) < 1e-10


def test_a_few_steps_lower_the_loss(model, tokenizer):
    m = copy.deepcopy(model).float()
    for p in m.parameters():  # a milder start than the randomized one, as a trained init would be
        p.data.mul_(0.5)
    set_trainable(m, "full", unfreeze_vision=True)
    samples = [SFTSample(s.pixels.float(), s.modality, s.input_ids, s.labels, s.seed)
               for s in (sample(m, tokenizer, 16, "the ball", 7), sample(m, tokenizer, 10, "bikes the", 8))]
    optimizer = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for step in range(12):
        loss, _ = sft_loss(m, samples, [2, 4, 8], torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.6 * losses[0] and losses[-1] == min(losses), losses


def test_ratio_schedule_and_grouped_sampler():
    schedule = parse_ratio_schedule(["5:2,4,8", "0:2"])
    assert schedule == [(0, (2,)), (5, (2, 4, 8))]
    assert ratios_at(schedule, 4) == (2,) and ratios_at(schedule, 5) == (2, 4, 8)
    with pytest.raises(ValueError, match="step 0"):
        parse_ratio_schedule(["3:2"])
    counts = [1, 2, 1, 2, 1, 2, 3, 1]
    sampler = StrideGroupedSampler(counts, 2, 0, 1, seed=0, start_step=0, total_steps=6)
    batches = [[i for i, _ in b] for b in sampler]
    assert all(counts[b[0]] == counts[b[1]] for b in batches)
    assert all(len(set(b)) == 2 for b in batches)
    # ranks split each global batch; a resumed sampler gives the same later batches
    ranks = [list(StrideGroupedSampler(counts, 2, r, 2, 0, 0, 6)) for r in (0, 1)]
    assert [[a[0][0], b[0][0]] for a, b in zip(*ranks)] == batches
    assert [[i for i, _ in b] for b in StrideGroupedSampler(counts, 2, 0, 1, 0, 3, 6)] == batches[3:]
    with pytest.raises(ValueError, match="share a window count"):
        StrideGroupedSampler([1, 2, 3], 2, 0, 1, 0, 0, 1)


# ------------------------------------------------------------------------------------- the command, resumed


@pytest.fixture(scope="module")
def run_folder(model, video_list, tmp_path_factory):
    """A checkpoint folder (tiny model, float32) and a JSONL data file: the sample clips (16 frames at 10 fps)
    and two still images (anyres), each with a one- or two-turn conversation."""
    from PIL import Image

    from pyvidfast.io import decode_frames

    root = tmp_path_factory.mktemp("sft")
    m = copy.deepcopy(model).float()
    for p in m.parameters():
        p.data.mul_(0.5)
    ckpt = write_folder(root / "ckpt", m, official_state(m))
    tiny_tokenizer(ckpt)
    clips = sorted({line.split()[0] for line in video_list.read_text().splitlines()})
    answers = ["the ball", "bikes", "the", "ball bikes"]
    rows = [{"video": str(video_list.parent / c), "conversations": [
        {"from": "human", "value": "<image>\nWhat happens ?"}, {"from": "gpt", "value": a}]}
        for c, a in zip(clips, answers)]
    for i in range(2):
        frame = decode_frames(str(video_list.parent / clips[i]), 1, start=0, stride=1, size=(72, 96))[0]
        Image.fromarray(frame.numpy()).save(root / f"still{i}.png")
        rows.append({"image": f"still{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat ?"}, {"from": "gpt", "value": answers[i]}]})
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root


def sft(run_folder, out, *extra):
    from pyvidfast.train.__main__ import main

    main(["videoxl-sft", "--data", str(run_folder / "data.jsonl"), "--checkpoint", str(run_folder / "ckpt"),
          "--out", str(out), "--steps", "4", "--batch-size", "2", "--lr", "1e-3", "--workers", "0", "--quiet",
          "--video-fps", "10", "--image-grid-pinpoints", "(1x1),...,(2x2)", "--unfreeze-vision",
          "--ratio-schedule", "0:2,4", "2:4,8,12", *extra])


def test_cli_runs_and_resume_replays_ratios(run_folder, tmp_path):
    sft(run_folder, tmp_path / "whole")
    sft(run_folder, tmp_path / "parts", "--stop-at", "2")
    sft(run_folder, tmp_path / "parts", "--resume", "auto")
    whole, parts = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "parts")
    assert [r["step"] for r in parts] == [1, 2, 3, 4]
    assert [r["ratios"] for r in whole] == [r["ratios"] for r in parts]
    assert np.allclose([r["loss"] for r in whole], [r["loss"] for r in parts], rtol=1e-5, atol=1e-6)
    # the schedule: 2/4 before step 2, 4/8/12 after; video samples have two windows of their own ratio draws
    for record in whole:
        allowed = {2, 4} if record["step"] <= 2 else {4, 8, 12}
        assert {r for per_sample in record["ratios"] for r in per_sample} <= allowed
        assert record["answer_tokens"] > 0
    # grouped: both samples of a step have the same window count (videos: 2 windows, images: 1)
    assert all(len({len(r) for r in record["ratios"]}) == 1 for record in whole)
    state = torch.load(tmp_path / "whole" / "checkpoint.pth", weights_only=True)["model"]
    assert "model.layers.0.self_attn.beacon_q_proj.weight" in state


def test_cli_projector_stage_bf16_checkpointing(run_folder, tmp_path):
    sft(run_folder, tmp_path / "stage1", "--stage", "projector", "--bf16", "--gradient-checkpointing")
    records = read_metrics(tmp_path / "stage1")
    assert len(records) == 4 and all(np.isfinite(r["loss"]) for r in records)
    assert all(r["windows"] == 0 for r in records)  # no VSTs in stage 1
    task = VideoXLSFT  # the registered name is the command's
    assert task.name == "videoxl-sft"


def test_fsdp_two_ranks_equal_ddp(run_folder, tmp_path):
    """FSDP2 on the model's units (each decoder layer, the vision tower) gives the DDP run's loss sequence: the
    sharding changes where parameters live, not what a step computes (each rank normalizes by its own answer
    tokens in both, as the official DDP code does)."""
    from test_train_scale import losses, torchrun

    argv = ["videoxl-sft", "--data", str(run_folder / "data.jsonl"), "--checkpoint", str(run_folder / "ckpt"),
            "--steps", "2", "--batch-size", "2", "--lr", "1e-3", "--workers", "0", "--quiet", "--video-fps", "10",
            "--image-grid-pinpoints", "(1x1),...,(2x2)", "--unfreeze-vision"]
    torchrun(2, [*argv, "--out", str(tmp_path / "ddp")])
    torchrun(2, [*argv, "--out", str(tmp_path / "fsdp"), "--fsdp"])
    ddp, fsdp = losses(tmp_path / "ddp"), losses(tmp_path / "fsdp")
    assert len(ddp) == 2 and np.allclose(ddp, fsdp, rtol=1e-5, atol=1e-6)
