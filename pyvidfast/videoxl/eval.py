"""Long-video evaluation of a Video-XL checkpoint folder: needle in a video haystack (NIAH) and multiple-choice
benchmarks in the Video-MME / MLVU layouts.

    python -m pyvidfast.videoxl.eval niah --checkpoint DIR --haystack movie.mp4 --qa qa.json --needles needles/ \\
        --frames 64 256 1024 2048 [--depths 0 25 50 75 100] [--ratio 16] --out results/niah
    python -m pyvidfast.videoxl.eval mc --checkpoint DIR --videos videos/ --questions videomme.json \\
        --layout videomme [--frames 128] [--ratio 16] --out results/videomme

NIAH as the official harness (``Video-XL/NIAH``) defines it: the haystack video sampled uniformly to N frames
(``np.linspace(0, n - 1, N)`` as integers), one needle image inserted as an extra frame at
``int(N * depth / 100)``, a multiple-choice question after the video, the answer prompted with ``Best option:(``,
greedy decoding, and a cell's score the fraction of questions whose reply, cut at its first ``)``, holds the right
letter. The QA file is the official ``qa.json`` layout (``retrieval_question``, ``answer``, ``needle`` lists).

Multiple choice: a question file (JSON list, JSON lines, or, for MLVU, a folder of per-task JSON files) whose
items name a video of ``--videos``; the options are lettered (A), (B), ... and the reply is scored as in NIAH.
Accuracy is reported overall and per category (Video-MME: duration and task type; MLVU: question type).
Results: ``results.json`` and, for NIAH, ``niah.png`` (depth x frames heat map).
"""

import argparse
import json
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pyvidfast.models.videoxl import CLIP_MEAN, CLIP_STD, IMAGE_TOKEN_INDEX, VideoXL, load_video

NIAH_DEPTHS = (0, 25, 50, 75, 100)
ANSWER_PREFIX = "Best option:("
SYSTEM = "You are a helpful assistant."


# ------------------------------------------------------------------------------------------------ shared pieces


def uniform_indices(count: int):
    """The harness's frame choice for ``load_video(indices=)``: ``count`` frames by ``np.linspace`` over the video."""
    def indices(num_frames: int, fps: float) -> list[int]:
        return np.linspace(0, num_frames - 1, count, dtype=int).tolist()

    return indices


def clip_image(path: str | Path, size: int) -> Tensor:
    """An image file as CLIP's processor prepares it: shortest side to ``size`` (antialiased bicubic), centre
    crop, CLIP mean/std: ``[3, size, size]``."""
    from PIL import Image

    with Image.open(path) as image:
        rgb = torch.from_numpy(np.asarray(image.convert("RGB")).copy())
    pixels = rgb.permute(2, 0, 1)[None].float() / 255
    height, width = pixels.shape[-2:]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bicubic", antialias=True).clamp(0, 1)[0]
    top, left = (new_h - size) // 2, (new_w - size) // 2
    pixels = pixels[:, top:top + size, left:left + size]
    return (pixels - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def insert_needle(frames: Tensor, needle: Tensor, depth_percent: float) -> Tensor:
    """``frames`` with ``needle`` as an extra frame at ``int(len(frames) * depth / 100)`` (the official point)."""
    at = int(len(frames) * (depth_percent * 0.01))
    return torch.cat([frames[:at], needle[None].to(frames.dtype), frames[at:]])


def answer_prompt_ids(tokenizer, question: str, system: str = SYSTEM) -> Tensor:
    """The official NIAH prompt: ChatML, the video right before the question, the reply begun with
    ``Best option:(``; tokenized around the placeholder as the official ``tokenizer_image_token``."""
    before = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
    after = f"{question}<|im_end|>\n<|im_start|>assistant\n{ANSWER_PREFIX}"
    ids = (tokenizer(before, add_special_tokens=False)["input_ids"] + [IMAGE_TOKEN_INDEX]
           + tokenizer(after, add_special_tokens=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def is_correct(reply: str, letter: str) -> bool:
    """The official scoring: the reply up to its first ')' holds the answer letter."""
    return letter in reply.split(")")[0]


@torch.no_grad()
def greedy_replies(model: VideoXL, tokenizer, prompts: Sequence[Tensor], videos: Sequence[Tensor],
                   ratio: int | None, max_new_tokens: int = 4) -> list[str]:
    """Greedy replies of a batch of prompts, each with its video."""
    device = model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = model.generate([p.to(device) for p in prompts], images=[v.to(device, dtype) for v in videos],
                         max_new_tokens=max_new_tokens, do_sample=False, ratio=ratio, eos_token_id=eos,
                         pad_token_id=eos)
    return [tokenizer.decode([t for t in row.tolist() if t != eos], skip_special_tokens=True) for row in out]


def plot_heat_map(values: Sequence[Sequence[float]], rows: Sequence[str], columns: Sequence[str], path: Path,
                  title: str, xlabel: str, ylabel: str, ax=None) -> None:
    """A score table (rows x columns, 0..1) as a red-to-green heat map with the values written in, as the
    paper's NIAH figure; draws into ``ax`` when given, else saves ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(max(3.2, 0.6 * len(columns) + 1.5), 3.2))
    ax.imshow(np.asarray(values, dtype=float), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    if own:
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


# ------------------------------------------------------------------------------------------------------- NIAH


@dataclass
class NeedleQA:
    image: Path
    question: str
    answer: str  # the letter


def read_niah_qa(path: str | Path, needles: str | Path | None = None) -> list[NeedleQA]:
    """The official ``qa.json``: lists ``retrieval_question``, ``answer`` (letters) and ``needle`` (image file
    names in ``needles``, default: the QA file's folder)."""
    path = Path(path)
    data = json.loads(path.read_text())
    missing = [k for k in ("retrieval_question", "answer", "needle") if k not in data]
    if missing:
        raise ValueError(f"qa: {str(path)!r} lacks {missing} (the official qa.json layout)")
    if not len(data["retrieval_question"]) == len(data["answer"]) == len(data["needle"]):
        raise ValueError(f"qa: {str(path)!r}: retrieval_question, answer and needle must have equal lengths")
    folder = Path(needles) if needles is not None else path.parent
    qa = [NeedleQA(folder / n, q, a) for q, a, n in zip(data["retrieval_question"], data["answer"], data["needle"])]
    for item in qa:
        if not item.image.is_file():
            raise FileNotFoundError(f"needles: no needle image {str(item.image)!r}")
    return qa


def niah(model: VideoXL, tokenizer, haystack: str | Path, qa: Sequence[NeedleQA], frame_counts: Sequence[int],
         depths: Sequence[float] = NIAH_DEPTHS, ratio: int | None = 16, max_new_tokens: int = 4,
         progress=None) -> dict:
    """Scores per (frames, depth): ``{"scores": {"N": {"d": fraction}}, "replies": ...}``; the questions of a
    cell run as one batch."""
    for n in frame_counts:
        if not 1 <= n <= 2048:
            raise ValueError(f"frames: expected counts in 1..2048; got {n}")
    size = model.model.vision_tower.image_size
    needles = [clip_image(item.image, size) for item in qa]
    prompts = [answer_prompt_ids(tokenizer, item.question) for item in qa]
    scores, replies = {}, {}
    for n in frame_counts:
        frames = load_video(haystack, size, indices=uniform_indices(n))
        scores[str(n)], replies[str(n)] = {}, {}
        for depth in depths:
            videos = [insert_needle(frames, needle, depth) for needle in needles]
            got = greedy_replies(model, tokenizer, prompts, videos, ratio, max_new_tokens)
            scores[str(n)][str(depth)] = sum(is_correct(r, item.answer) for r, item in zip(got, qa)) / len(qa)
            replies[str(n)][str(depth)] = got
            if progress is not None:
                progress(n, depth, scores[str(n)][str(depth)])
    return {"task": "niah", "haystack": str(haystack), "ratio": ratio, "depths": list(depths),
            "frames": list(frame_counts), "scores": scores, "replies": replies}


def niah_heat_map(results: dict, path: Path) -> None:
    frames = [str(n) for n in results["frames"]]
    depths = [str(d) for d in results["depths"]]
    values = [[results["scores"][n][d] for n in frames] for d in depths]
    plot_heat_map(values, [f"{float(d):g}%" for d in depths], frames, path,
                  f"NIAH, ratio {results['ratio']}", "frames", "needle depth")


# ------------------------------------------------------------------------------------------- multiple choice


@dataclass
class Question:
    video: str
    question: str
    options: list[str]
    answer: str  # the letter
    categories: dict[str, str]


def _strip_letter(option: str, letter: str) -> str:
    """Video-MME writes options as "A. text"; keep the text."""
    for prefix in (f"{letter}. ", f"{letter}.", f"({letter}) ", f"{letter}) "):
        if option.startswith(prefix):
            return option[len(prefix):]
    return option


def _read_items(path: Path) -> list[dict]:
    if path.is_dir():
        return [item for f in sorted(path.glob("*.json")) for item in _read_items(f)]
    text = path.read_text()
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        items = [json.loads(line) for line in text.splitlines() if line.strip()]
    return items if isinstance(items, list) else [items]


def read_questions(path: str | Path, layout: str) -> list[Question]:
    """Questions of a benchmark file in its public layout.

    ``videomme``: items with ``videoID`` (the file stem), ``question``, ``options`` ("A. ..."), ``answer`` (a
    letter), categories ``duration`` and ``task_type``. ``mlvu``: items with ``video`` (a file name),
    ``question``, ``candidates`` (texts), ``answer`` (the right candidate's text), category ``question_type``;
    a folder of such JSON files (one per task) is read whole."""
    path = Path(path)
    questions = []
    for i, item in enumerate(_read_items(path)):
        try:
            if layout == "videomme":
                letters = string.ascii_uppercase[:len(item["options"])]
                questions.append(Question(item["videoID"], item["question"],
                                          [_strip_letter(o, l) for o, l in zip(item["options"], letters)],
                                          item["answer"].strip(),
                                          {k: str(item[k]) for k in ("duration", "task_type") if k in item}))
            elif layout == "mlvu":
                candidates = list(item["candidates"])
                questions.append(Question(item["video"], item["question"], candidates,
                                          string.ascii_uppercase[candidates.index(item["answer"])],
                                          {"question_type": str(item.get("question_type", "all"))}))
            else:
                raise ValueError(f"layout: expected 'videomme' or 'mlvu'; got {layout!r}")
        except (KeyError, ValueError) as error:
            if isinstance(error, ValueError) and "layout" in str(error):
                raise
            raise ValueError(f"questions: item {i} of {str(path)!r} does not follow the {layout} layout "
                             f"({error!r})") from None
    return questions


def question_text(q: Question) -> str:
    options = "\n".join(f"({string.ascii_uppercase[i]}) {o}" for i, o in enumerate(q.options))
    return f"Question: {q.question}\nOptions:\n{options}\nAnswer with the option's letter from the given choices."


def find_video(folder: Path, name: str) -> Path:
    """``name`` in ``folder`` (also in its subfolders, and with a video suffix when it has none)."""
    for candidate in (folder / name, *(folder / f"{name}{s}" for s in (".mp4", ".mkv", ".webm", ".avi"))):
        if candidate.is_file():
            return candidate
    found = sorted(p for p in folder.rglob(f"{Path(name).stem}.*") if p.is_file())
    if not found:
        raise FileNotFoundError(f"videos: no video {name!r} under {str(folder)!r}")
    return found[0]


def multiple_choice(model: VideoXL, tokenizer, videos: str | Path, questions: Sequence[Question], frames: int = 128,
                    ratio: int | None = 16, batch: int = 4, max_new_tokens: int = 4) -> dict:
    """Accuracy overall and per category value: ``{"accuracy": a, "categories": {"task_type": {"X": a}},
    "items": [...]}``."""
    folder = Path(videos)
    size = model.model.vision_tower.image_size
    items = []
    for start in range(0, len(questions), batch):
        part = questions[start:start + batch]
        clips = [load_video(find_video(folder, q.video), size, indices=uniform_indices(frames)) for q in part]
        got = greedy_replies(model, tokenizer, [answer_prompt_ids(tokenizer, question_text(q)) for q in part], clips,
                             ratio, max_new_tokens)
        items += [{"video": q.video, "answer": q.answer, "reply": r, "correct": is_correct(r, q.answer),
                   **q.categories} for q, r in zip(part, got)]
    categories = {}
    for key in sorted({k for q in questions for k in q.categories}):
        values = sorted({item[key] for item in items if key in item})
        categories[key] = {v: float(np.mean([item["correct"] for item in items if item.get(key) == v]))
                           for v in values}
    return {"task": "multiple_choice", "frames": frames, "ratio": ratio, "questions": len(items),
            "accuracy": float(np.mean([item["correct"] for item in items])) if items else 0.0,
            "categories": categories, "items": items}


# ---------------------------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pyvidfast.videoxl.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("niah", "needle in a video haystack"), ("mc", "multiple-choice benchmark (Video-MME, MLVU)")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--checkpoint", required=True, help="official-layout folder: config, weights, tokenizer")
        s.add_argument("--ratio", type=int, default=16, help="fixed compression ratio (0: config.beacon_ratio)")
        s.add_argument("--out", required=True, help="folder for results.json (and niah.png)")
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        s.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"), default=None,
                       help="default: bfloat16 on CUDA, float32 on the CPU")
        s.add_argument("--max-new-tokens", type=int, default=4)
        if name == "niah":
            s.add_argument("--haystack", required=True, help="a video file")
            s.add_argument("--qa", required=True, help="the official qa.json layout")
            s.add_argument("--needles", default=None, help="folder of the needle images (default: the QA's)")
            s.add_argument("--frames", type=int, nargs="+", required=True, help="haystack frame counts (1..2048)")
            s.add_argument("--depths", type=float, nargs="+", default=list(NIAH_DEPTHS), help="needle depths, %%")
        else:
            s.add_argument("--videos", required=True, help="folder of the benchmark's videos")
            s.add_argument("--questions", required=True, help="question file (or MLVU's folder of JSON files)")
            s.add_argument("--layout", choices=("videomme", "mlvu"), required=True)
            s.add_argument("--frames", type=int, default=128, help="frames per video, uniform")
            s.add_argument("--batch", type=int, default=4, help="questions per generate call")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
              "float64": torch.float64}
    dtype = dtypes[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    model = VideoXL.from_pretrained(args.checkpoint, dtype=dtype, device=args.device).eval()
    if model.tokenizer is None:
        print(f"error: {args.checkpoint} has no tokenizer files", file=sys.stderr)
        return 2
    ratio = args.ratio or None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.command == "niah":
        qa = read_niah_qa(args.qa, args.needles)
        results = niah(model, model.tokenizer, args.haystack, qa, args.frames, args.depths, ratio,
                       args.max_new_tokens, progress=lambda n, d, s: print(f"frames {n} depth {d:g}%: {s:.2f}",
                                                                           flush=True))
        niah_heat_map(results, out / "niah.png")
        print(f"mean score: {np.mean([v for row in results['scores'].values() for v in row.values()]):.3f}")
    else:
        questions = read_questions(args.questions, args.layout)
        results = multiple_choice(model, model.tokenizer, args.videos, questions, args.frames, ratio, args.batch,
                                  args.max_new_tokens)
        print(f"accuracy: {results['accuracy']:.3f} over {results['questions']} questions")
        for key, values in results["categories"].items():
            print(f"  {key}: " + ", ".join(f"{v} {a:.3f}" for v, a in values.items()))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
