"""A needle task a small Video-XL learns on the CPU: does the compressed memory (the VSTs) carry what a model needs?

A haystack is N frames of the real sample clips (pyvidfast.samples) at 56x56; one needle frame, a solid colour
from a palette of four, is inserted at depth d (0/25/50/75/100% of the haystack, as the official NIAH harness
inserts its needle image). Haystack lengths n have n + 1 a multiple of 4 (see
:func:`haystack_length`). The question "which colour ?" has a one-token answer (chance 25%). A small Video-XL
(tiny CLIP, small Qwen2, random init, a word-level tokenizer of the task's own words) is trained with the
``videoxl-sft`` loss on short haystacks at ratios 2/4/8, then evaluated greedily on longer haystacks and larger
ratios than it saw, and once more with the VST memory removed (the text then sees nothing of the video, so
accuracy must fall to chance).

    python -m bench.videoxl_needle [--steps 1600] [--out bench/results]    # JSON + PNG heat map (~15 min, 1 thread)

Results: ``bench/results/videoxl_needle.json`` (accuracy per depth x length x ratio, chance, the no-memory
ablation, training curve, CPU) and ``videoxl_needle.png``.
"""

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from transformers import CLIPVisionConfig

from pyvidfast.models.videoxl import CLIP_MEAN, CLIP_STD, VideoXL, load_video, qwen2_7b_config
from pyvidfast.train.tasks.videoxl import sft_loss
from pyvidfast.videoxl.data import SFTSample, encode_conversation, word_tokenizer

COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 0.8, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0)}
QUESTION = "which colour ?"
SYSTEM = "find the needle ."
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
SIZE = 56  # 4x4 patches of 14, pooled 2x2: 4 tokens per frame
WINDOW = 48  # 12 frames: the tiny analogue of 1440 = 10 frames of 144; divisible by 2, 4, 8, 12, 16


def task_tokenizer():
    """A word-level tokenizer of the task's own words."""
    return word_tokenizer(["system", "user", "assistant", *sorted(set(f"{SYSTEM} {QUESTION}".split())), *COLOURS])


def small_videoxl(vocab: int, seed: int = 0) -> VideoXL:
    """A tiny CLIP (2 layers, width 48) and a small Qwen2 (3 layers, width 96), random init."""
    torch.manual_seed(seed)
    config = qwen2_7b_config(vocab_size=vocab, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                             beacon_window=WINDOW, beacon_stride=WINDOW, beacon_ratio=[2, 4, 8], mm_hidden_size=48,
                             eos_token_id=3, bos_token_id=None, rope_theta=10000.0)
    vision = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                              image_size=SIZE, patch_size=14, hidden_act="quick_gelu")
    return VideoXL(config, vision)


def haystack_pool(paths: Sequence[str], frames_per_clip: int = 64) -> torch.Tensor:
    """CLIP-preprocessed frames of the real clips, ``[clips * frames_per_clip, 3, 56, 56]``."""
    return torch.cat([load_video(p, SIZE, frames=frames_per_clip) for p in paths])


def needle_frame(colour: str) -> torch.Tensor:
    rgb = torch.tensor(COLOURS[colour])
    return ((rgb - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))[:, None, None].expand(3, SIZE, SIZE)


@dataclass
class Needle:
    frames: torch.Tensor  # [N + 1, 3, 56, 56]
    colour: str
    depth: float


def make_needle(pool: torch.Tensor, length: int, depth: float, colour: str, generator: torch.Generator) -> Needle:
    """A haystack of ``length`` consecutive pool frames (a random clip segment, wrapping) with the needle inserted
    as an extra frame at ``round(depth * length)``."""
    start = int(torch.randint(len(pool), (1,), generator=generator))
    hay = pool[(start + torch.arange(length)) % len(pool)]
    at = round(depth * length)
    return Needle(torch.cat([hay[:at], needle_frame(colour)[None], hay[at:]]), colour, depth)


def training_sample(needle: Needle, tokenizer, seed: int) -> SFTSample:
    turns = [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": needle.colour}]
    ids, labels = encode_conversation(tokenizer, turns, SYSTEM)
    return SFTSample(needle.frames, "video", ids, labels, seed)


def prompt_ids(tokenizer) -> torch.Tensor:
    """The conversation up to the answer (the prompt greedy decoding continues)."""
    ids, labels = encode_conversation(tokenizer, [{"from": "human", "value": f"<image>\n{QUESTION}"},
                                                  {"from": "gpt", "value": "red"}], SYSTEM)
    return ids[:int((labels != -100).nonzero()[0])]


def haystack_length(low: int, high: int, generator: torch.Generator) -> int:
    """A haystack length in [low, high] whose video (with the needle) is a whole number of 4-frame groups, so every
    window's 4 * frames tokens divide by every ratio up to 16, as 144 tokens per frame do in the real model
    (otherwise the raw tokens after a window's last VST, the needle among them, would be dropped)."""
    choices = [n for n in range(low, high + 1) if (n + 1) % 4 == 0]
    if not choices:
        raise ValueError(f"lengths: no haystack length n in [{low}, {high}] with n + 1 a multiple of 4")
    return choices[int(torch.randint(len(choices), (1,), generator=generator))]


def train(model: VideoXL, pool: torch.Tensor, tokenizer, steps: int, batch: int = 8,
          lengths: Sequence[int] = (3, 23), ratios: Sequence[int] = (2, 4, 8), lr: float = 3e-3, seed: int = 0,
          log_every: int = 0, grow: float = 0.5) -> list[float]:
    """AdamW on the ``videoxl-sft`` loss (every parameter trained, CLIP included), depths and colours uniform,
    haystack lengths in ``[lengths[0], L]`` with L growing from ``lengths[0] + 4`` to ``lengths[1]`` over the first
    ``grow`` of the steps (short haystacks first: the needle is found sooner); returns the losses."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    names = list(COLOURS)
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        reach = min(1.0, step / max(1.0, grow * steps))
        longest = round(lengths[0] + 4 + reach * (lengths[1] - lengths[0] - 4))
        samples = []
        for b in range(batch):
            length = haystack_length(lengths[0], max(longest, lengths[0]), g)
            depth = float(torch.rand(1, generator=g))
            colour = names[int(torch.randint(len(names), (1,), generator=g))]
            samples.append(training_sample(make_needle(pool, length, depth, colour, g), tokenizer, step))
        loss, _ = sft_loss(model, samples, list(ratios), g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}: loss {sum(losses[-log_every:]) / log_every:.3f}", flush=True)
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: VideoXL, pool: torch.Tensor, tokenizer, length: int, depth: float, ratio: int, samples: int,
             keep_vsts: bool = True, seed: int = 1, batch: int = 16) -> float:
    """Greedy accuracy (the argmax over the whole vocabulary is the colour asked) on ``samples`` haystacks,
    colours balanced."""
    names = list(COLOURS)
    ids = prompt_ids(tokenizer)
    want = torch.tensor(tokenizer.convert_tokens_to_ids(names))
    g = torch.Generator().manual_seed(seed * 7919 + length * 31 + round(depth * 100))
    correct = 0
    for start in range(0, samples, batch):
        needles = [make_needle(pool, length, depth, names[i % len(names)], g)
                   for i in range(start, min(start + batch, samples))]
        result = model.prefill([ids] * len(needles), [n.frames for n in needles], ratio=ratio, keep_vsts=keep_vsts)
        picked = torch.stack([row[-1] for row in result.logits]).argmax(-1)
        correct += int((picked == want[[names.index(n.colour) for n in needles]]).sum())
    return correct / samples


def grid(model, pool, tokenizer, lengths, ratios, samples, keep_vsts=True) -> dict:
    """Accuracy per (length, ratio, depth): ``{"L": {"r": {"d": acc}}}``."""
    return {str(length): {str(r): {str(d): accuracy(model, pool, tokenizer, length, d, r, samples, keep_vsts)
                                   for d in DEPTHS} for r in ratios} for length in lengths}


def heat_map(results: dict, path: Path) -> None:
    """One panel per ratio: depth (rows) x haystack length (columns), as the paper's NIAH figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pyvidfast.videoxl.eval import plot_heat_map

    table = results["accuracy"]
    lengths = list(table)
    ratios = list(table[lengths[0]])
    fig, axes = plt.subplots(1, len(ratios), figsize=(3.2 * len(ratios), 3.4), squeeze=False)
    for ax, r in zip(axes[0], ratios):
        plot_heat_map([[table[length][r][str(d)] for length in lengths] for d in DEPTHS],
                      [f"{round(d * 100)}%" for d in DEPTHS], lengths, path, f"ratio {r}", "haystack frames",
                      "needle depth", ax=ax)
    fig.suptitle(f"Video-XL needle (trained <= {results['train_lengths'][1]} frames, ratios "
                 f"{results['train_ratios']}); chance {results['chance']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def needle_table(results: dict) -> str:
    """Mean accuracy over the depths per haystack length x ratio, and the no-memory ablation (Markdown)."""
    from bench.common import markdown_table

    table, ablation = results["accuracy"], results["no_memory"]
    ratios = list(table[next(iter(table))])
    trained = results["train_lengths"][1]
    rows = []
    for length, cells in table.items():
        removed = ablation.get(length, {}).get(ratios[-1])
        rows.append([f"{length} ({int(length) / trained:.0f}x the longest trained)" if int(length) != trained
                     else f"{length} (the longest trained)",
                     *[f"{sum(c.values()) / len(c):.2f}" for c in cells.values()],
                     f"{sum(removed.values()) / len(removed):.2f}" if removed else ""])
    return markdown_table(["haystack frames", *[f"ratio {r}" for r in ratios],
                           f"ratio {ratios[-1]}, VST memory removed"], rows)


def main(argv=None) -> dict:
    from bench.common import machine
    from pyvidfast import samples as sample_clips

    p = argparse.ArgumentParser(prog="python -m bench.videoxl_needle", description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-lengths", type=int, nargs=2, default=[3, 47], help="haystack frames drawn in training")
    p.add_argument("--lengths", type=int, nargs="+", default=[47, 95, 191],
                   help="evaluated haystack frames (+1 needle frame: 48, 96, 192)")
    p.add_argument("--ratios", type=int, nargs="+", default=[2, 4, 8, 16], help="evaluated compression ratios")
    p.add_argument("--samples", type=int, default=32, help="haystacks per cell")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer = task_tokenizer()
    pool = haystack_pool([str(sample_clips.sample_path(n)) for n in sorted(sample_clips.CLIPS)])
    model = small_videoxl(len(tokenizer))
    began = time.perf_counter()
    losses = train(model, pool, tokenizer, args.steps, args.batch, args.train_lengths, lr=args.lr, log_every=50)
    train_s = time.perf_counter() - began
    results = {"machine": machine(), "threads": args.threads, "steps": args.steps, "batch": args.batch,
               "train_lengths": args.train_lengths, "train_ratios": [2, 4, 8], "train_s": round(train_s, 1),
               "chance": 1 / len(COLOURS), "samples_per_cell": args.samples,
               "loss_first_50": sum(losses[:50]) / min(50, len(losses)),
               "loss_last_50": sum(losses[-50:]) / min(50, len(losses))}
    results["accuracy"] = grid(model, pool, tokenizer, args.lengths, args.ratios, args.samples)
    longest, largest = max(args.lengths), max(args.ratios)
    results["no_memory"] = {str(longest): {str(largest): {str(d): accuracy(
        model, pool, tokenizer, longest, d, largest, args.samples, keep_vsts=False) for d in DEPTHS}}}
    cell = results["accuracy"][str(longest)][str(largest)]
    results["summary"] = {
        f"accuracy_{longest}_frames_ratio_{largest}": sum(cell.values()) / len(cell),
        f"no_memory_{longest}_frames_ratio_{largest}": sum(results["no_memory"][str(longest)][str(largest)].values())
        / len(DEPTHS)}
    results["table"] = needle_table(results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "videoxl_needle.json").write_text(json.dumps(results, indent=1))
    heat_map(results, out / "videoxl_needle.png")
    print(json.dumps(results["summary"]), flush=True)
    return results


if __name__ == "__main__":
    main()
