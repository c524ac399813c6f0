"""Video-XL training data: LLaVA conversation samples, the official frame choice, label masking and the
stride-grouped batch sampler.

A data file is a JSON list (or JSON lines) of samples in the LLaVA layout the official scripts read::

    {"video": "clips/a.mp4", "conversations": [{"from": "human", "value": "<image>\\nWhat happens?"},
                                               {"from": "gpt", "value": "A ball bounces."}]}

(``"image"`` instead of ``"video"`` for a still image, tiled ``anyres``; neither for a text-only sample). Paths
are relative to ``root`` (default: the data file's folder). Frames follow the official fine-tuning scripts: one
per second for videos shorter than ``frames_upbound`` seconds, else ``frames_upbound`` spread uniformly over the
whole video (``np.linspace(0, n - 1, upbound)`` as integers).
"""

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from pyvidfast.models.videoxl import IMAGE_TOKEN_INDEX, anyres_tiles, load_video
from pyvidfast.train.data import sample_seed

IGNORE_INDEX = -100
ROLES = {"human": "user", "gpt": "assistant"}
DEFAULT_SYSTEM = "You are a helpful assistant."
# The official image stage's tiling (anyres with up to 7x7 tiles of 336^2).
DEFAULT_GRID_PINPOINTS = "(1x1),...,(7x7)"


def word_tokenizer(words: Sequence[str], path: str | Path | None = None):
    """A word-level HF tokenizer over ``words`` (split on whitespace and punctuation runs) with ChatML's markers
    as special tokens (``<|im_end|>`` = eos): for small models trained on a task's own vocabulary. Saved to
    ``path`` when given (a checkpoint folder's tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[UNK]", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = list(dict.fromkeys([*specials, *words]))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials[1:])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    if path is not None:
        fast.save_pretrained(str(path))
    return fast


def read_samples(path: str | Path) -> list[dict]:
    """The samples of a JSON list or JSON-lines file, checked: each has ``conversations`` with human/gpt turns,
    starting with a human turn, and at most one of ``video``/``image``."""
    path = Path(path)
    text = path.read_text()
    try:
        samples = json.loads(text)
    except json.JSONDecodeError:
        samples = [json.loads(line) for line in text.splitlines() if line.strip()]
    if isinstance(samples, dict):
        samples = [samples]
    for i, sample in enumerate(samples):
        turns = sample.get("conversations") if isinstance(sample, dict) else None
        if not turns or not all(isinstance(t, dict) and t.get("from") in ROLES for t in turns):
            raise ValueError(f"data: sample {i} of {str(path)!r} needs 'conversations', a list of "
                             f"{{'from': 'human'|'gpt', 'value': ...}} turns")
        if turns[0]["from"] != "human" or not any(t["from"] == "gpt" for t in turns):
            raise ValueError(f"data: sample {i} of {str(path)!r} must start with a human turn and hold a gpt turn")
        if "video" in sample and "image" in sample:
            raise ValueError(f"data: sample {i} of {str(path)!r} has both 'video' and 'image'")
        visual = "video" in sample or "image" in sample
        placeholders = sum(t["value"].count("<image>") for t in turns)
        if placeholders != int(visual):
            raise ValueError(f"data: sample {i} of {str(path)!r} must hold the <image> placeholder exactly "
                             f"{int(visual)} time(s) (once with a video or image); found {placeholders}")
    return samples


def training_frame_indices(num_frames: int, fps: float, upbound: int, video_fps: float = 1.0) -> list[int]:
    """The official fine-tuning frame choice: every ``round(fps / video_fps)``-th frame (1 fps), or, when that
    gives more than ``upbound`` frames, ``upbound`` frames spread uniformly over the whole video."""
    if num_frames < 1:
        raise ValueError("video: it has no frames")
    step = max(1, round(fps / video_fps))
    indices = list(range(0, num_frames, step))
    if upbound > 0 and len(indices) > upbound:
        indices = np.linspace(0, num_frames - 1, upbound, dtype=int).tolist()
    return indices


def encode_conversation(tokenizer, turns: Sequence[dict], system: str = DEFAULT_SYSTEM) -> tuple[Tensor, Tensor]:
    """ChatML ids of a conversation (the official ``qwen_1_5`` template; ``<image>`` -> IMAGE_TOKEN_INDEX) and
    its labels: the answer text of every gpt turn and the ``<|im_end|>`` closing it; everything else (system and
    user turns, role headers, the placeholder) is IGNORE_INDEX. (The official ``preprocess_qwen`` also labels
    the ``<|im_start|>``/``<|im_end|>``/newline markers of every turn, which carry no information.)"""
    def tokens(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    ids, labels = [], []

    def add(piece: list[int], labelled: bool) -> None:
        ids.extend(piece)
        labels.extend(piece if labelled else [IGNORE_INDEX] * len(piece))

    add(tokens(f"<|im_start|>system\n{system}<|im_end|>\n"), False)
    for turn in turns:
        role = ROLES[turn["from"]]
        add(tokens(f"<|im_start|>{role}\n"), False)
        value = turn["value"]
        if role == "user":
            before, image, after = value.partition("<image>")
            add(tokens(before), False)
            if image:
                add([IMAGE_TOKEN_INDEX], False)
            add(tokens(after) + tokens("<|im_end|>\n"), False)
        else:
            add(tokens(value) + tokens("<|im_end|>"), True)
            add(tokens("\n"), False)
    return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


@dataclass
class SFTSample:
    """One training sample: pixels (a video ``[F, 3, S, S]``, or an anyres image ``[1 + tiles, 3, S, S]``, or
    None), its modality, ids and labels aligned with them, and its seed."""

    pixels: Tensor | None
    modality: str
    input_ids: Tensor
    labels: Tensor
    seed: int


@dataclass
class SFTBatch:
    """A batch for :class:`pyvidfast.train.tasks.videoxl.VideoXLSFT` (the loop reads ``video`` for the device,
    ``seeds`` and ``step_seed``)."""

    samples: list[SFTSample]

    @property
    def video(self) -> Tensor:
        """A tensor on the batch's device (the loop's autocast asks it)."""
        return self.samples[0].input_ids

    @property
    def seeds(self) -> list[int]:
        return [s.seed for s in self.samples]

    @property
    def skipped(self) -> list[str]:
        """Broken files replaced in the batch (the loop logs them): none, this data set fails on a broken file."""
        return []

    @property
    def num_tokens(self) -> int:
        """Text tokens of the batch (the loop's tokens/s); the visual tokens are the model's choice per window."""
        return sum(s.input_ids.numel() for s in self.samples)

    @property
    def step_seed(self) -> int:
        from pyvidfast.train.data import SLOTS

        return self.seeds[0] // SLOTS

    def to(self, device: torch.device) -> "SFTBatch":
        return SFTBatch([SFTSample(None if s.pixels is None else s.pixels.to(device, non_blocking=True), s.modality,
                                   s.input_ids.to(device), s.labels.to(device), s.seed) for s in self.samples])


def collate_samples(samples: list[SFTSample]) -> SFTBatch:
    return SFTBatch(list(samples))


class SFTDataset(Dataset):
    """``(index, seed)`` items -> :class:`SFTSample` of a LLaVA-layout data file.

    ``tokens_per_frame`` and ``window`` (the model's) give each sample's window count for the grouped sampler."""

    def __init__(self, path: str | Path, tokenizer, image_size: int, tokens_per_frame: int, window: int,
                 root: str | Path | None = None, frames_upbound: int = 128, video_fps: float = 1.0,
                 grid_pinpoints=DEFAULT_GRID_PINPOINTS, system: str = DEFAULT_SYSTEM):
        self.samples = read_samples(path)
        self.root = Path(root) if root is not None else Path(path).parent
        self.tokenizer, self.image_size, self.system = tokenizer, image_size, system
        self.tokens_per_frame, self.window = tokens_per_frame, window
        self.frames_upbound, self.video_fps, self.grid_pinpoints = frames_upbound, video_fps, grid_pinpoints
        self._windows: list[int] | None = None

    def __len__(self) -> int:
        return len(self.samples)

    def frame_indices(self, num_frames: int, fps: float) -> list[int]:
        return training_frame_indices(num_frames, fps, self.frames_upbound, self.video_fps)

    def visual_count(self, index: int) -> int:
        """Frames (or image tiles) the sample's visual input becomes, read from the file's header only."""
        sample = self.samples[index]
        if "video" in sample:
            from pyvidfast.io import VideoReader

            with VideoReader(self.root / sample["video"]) as reader:
                return len(self.frame_indices(len(reader), reader.metadata.fps))
        if "image" in sample:
            from PIL import Image

            from pyvidfast.models.videoxl import best_resolution, parse_grid_pinpoints

            with Image.open(self.root / sample["image"]) as image:
                w, h = best_resolution(*image.size, parse_grid_pinpoints(self.grid_pinpoints, self.image_size))
            return (w // self.image_size) * (h // self.image_size)
        return 0

    def window_counts(self) -> list[int]:
        """Beacon windows per sample (0 for text-only), computed once."""
        if self._windows is None:
            self._windows = [math.ceil(self.visual_count(i) * self.tokens_per_frame / self.window)
                             for i in range(len(self))]
        return self._windows

    def __getitem__(self, item: tuple[int, int]) -> SFTSample:
        index, seed = item
        sample = self.samples[index]
        ids, labels = encode_conversation(self.tokenizer, sample["conversations"], self.system)
        if "video" in sample:
            pixels = load_video(self.root / sample["video"], self.image_size, indices=self.frame_indices)
            return SFTSample(pixels, "video", ids, labels, seed)
        if "image" in sample:
            from PIL import Image

            with Image.open(self.root / sample["image"]) as image:
                rgb = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
            return SFTSample(anyres_tiles(rgb, self.grid_pinpoints, self.image_size), "image", ids, labels, seed)
        return SFTSample(None, "video", ids, labels, seed)


class StrideGroupedSampler:
    """The official ``StrideGroupedSampler`` ("strict") as a batch sampler over steps: per epoch, the samples
    shuffled (seed, epoch), sorted by window count (stable), cut into global batches of equal window count
    (an incomplete group is dropped), the batches shuffled; step s takes the next batch, each rank its
    contiguous share. Yields lists of ``(index, sample seed)``; like the loop's step sampler, everything is a
    function of (seed, step), so ``--resume`` replays the same batches."""

    def __init__(self, window_counts: Sequence[int], global_batch: int, rank: int, world: int, seed: int,
                 start_step: int, total_steps: int):
        if global_batch % world:
            raise ValueError(f"batch_size: the global batch {global_batch} must be a multiple of the {world} ranks")
        self.counts = list(window_counts)
        self.global_batch, self.rank, self.world = global_batch, rank, world
        self.seed, self.start_step, self.total_steps = seed, start_step, total_steps
        if not self.epoch_batches(0):
            raise ValueError(f"batch_size: no {global_batch} samples share a window count "
                             f"(counts: {sorted(set(self.counts))}); lower --batch-size")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.counts), generator=generator).tolist()
        order.sort(key=lambda i: self.counts[i])
        batches, current = [], []
        for i in order:
            if current and self.counts[current[-1]] != self.counts[i]:
                current = []
            current.append(i)
            if len(current) == self.global_batch:
                batches.append(current)
                current = []
        return [batches[j] for j in torch.randperm(len(batches), generator=generator).tolist()]

    def __len__(self) -> int:
        return max(self.total_steps - self.start_step, 0)

    def __iter__(self):
        local = self.global_batch // self.world
        per_epoch = len(self.epoch_batches(0))
        cached = {}
        for step in range(self.start_step, self.total_steps):
            epoch, position = divmod(step, per_epoch)
            if epoch not in cached:
                cached = {epoch: self.epoch_batches(epoch)}
            batch = cached[epoch][position]
            first = self.rank * local
            yield [(batch[first + j], sample_seed(self.seed, step, first + j)) for j in range(local)]
