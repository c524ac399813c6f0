"""Fills the benchmark tables of README.md and docs/*.md from the committed runs in bench/results/*.json.

A table in a page is a block

    <!-- table: NAME -->
    ...                      (written by this script: a caption naming the run's machine, then the table)
    <!-- end table -->

filled from bench/results/NAME.json, whose "table" key holds the Markdown table its benchmark wrote
(``python -m bench.NAME``). The block ``headline`` is the README's one table of headline figures, picked from
several runs. Without a committed run, a block says how to make one.

    python -m bench.report            # rewrite the blocks
    python -m bench.report --check    # exit 1 if a page differs from its runs (a test runs this)
"""

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end table -->)", re.DOTALL)


class ReportError(Exception):
    """A run that cannot fill its table (no "table" key, or the fields the headline needs are missing)."""


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def load_run(name: str, results_dir: Path) -> dict | None:
    path = results_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def caption(runs: dict[str, dict]) -> str:
    """One line per machine and torch: CPU model, ISA, threads, torch version, GPU if any, the date of the run(s)
    and the JSON files."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for name, run in runs.items():
        m = run.get("machine", {})
        where = (f"{m.get('cpu_model', m.get('cpu', 'unknown CPU'))}, {m.get('isa', 'unknown ISA')}, "
                 f"{m.get('threads', '?')} thread{'' if m.get('threads') == 1 else 's'}, torch {m.get('torch', '?')}")
        if m.get("gpu"):
            where += f", GPU {m['gpu']}"
        groups.setdefault(where, []).append((name, m.get("date", "undated")))
    lines = []
    for where, items in groups.items():
        dates = sorted({date for _, date in items})
        if len(dates) == 1:
            files = ", ".join(f"`bench/results/{name}.json`" for name, _ in items)
            lines.append(f"_Run on {where}, {dates[0]}: {files}._")
        else:
            files = ", ".join(f"`bench/results/{name}.json` {date}" for name, date in items)
            lines.append(f"_Runs on {where}: {files}._")
    return "\n".join(lines)


def not_run(command: str, name: str) -> str:
    return (f"_No committed run yet: `{command}` writes `bench/results/{name}.json`, then `python -m bench.report` "
            "fills this table._")


# What a table says before its first run, where `python -m bench.NAME` is not what makes the run.
NOT_RUN = {"gpu_check": "_No committed run yet: `bash bench/gpu_check.sh` on the GPU machine (see How to run it) "
                        "writes `$OUT/gpu_check.json`; copied to `bench/results/`, `python -m bench.report` fills "
                        "this table._"}


def render_table(name: str, results_dir: Path) -> str:
    run = load_run(name, results_dir)
    if run is None:
        return NOT_RUN.get(name) or not_run(f"python -m bench.{name}", name)
    if not isinstance(run.get("table"), str):
        raise ReportError(f"{results_dir / (name + '.json')}: no \"table\" key (a Markdown string); the benchmark "
                          f"that writes it must pass its table to bench.common.write_json")
    return caption({name: run}) + "\n\n" + run["table"].strip()


def _field(run: dict, name: str, *keys):
    """run[keys[0]][keys[1]]..., or a ReportError naming the file and the missing key."""
    value = run
    for key in keys:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            raise ReportError(f"bench/results/{name}.json: no {'/'.join(map(str, keys))} (the headline reads it)")
    return value


def _pick(run: dict, name: str, **match) -> dict:
    """The entry of run["results"] whose fields equal match."""
    for entry in _field(run, name, "results"):
        if all(entry.get(k) == v for k, v in match.items()):
            return entry
    raise ReportError(f"bench/results/{name}.json: no result with {match} (the headline reads it)")


def _ms(value: float) -> str:
    return f"{value:.3g} ms" if value < 1000 else f"{value:,.0f} ms"


def headline_rlt(run: dict, name: str) -> list[list[str]]:
    b, t, h = _field(run, name, "shape")[:3]
    ours = _field(run, name, "results", "ours_from_uint8", "median_ms")
    base = _field(run, name, "results", "original_pytorch_from_float", "median_ms")
    return [["`rlt_tokenize`", f"{b} x {t} x {h}² uint8 clips", _ms(ours), f"RLT's PyTorch ops {_ms(base)}",
             f"{base / ours:.0f}x"]]


def headline_varlen_attention(run: dict, name: str) -> list[list[str]]:
    rows = []
    for dtype, label in (("torch.float32", "fp32"), ("torch.bfloat16", "bf16")):
        entry = _pick(run, name, workload="rlt-8-clips", dtype=dtype, **{"pass": "fwd+bwd"})
        ours, loop, padded = (entry["paths"][k]["median_ms"] for k in ("ours", "loop", "padded"))
        rows.append(["`varlen_attention` fwd+bwd", f"RLT-packed ViT-B heads, 8 real clips, {label}", _ms(ours),
                     f"SDPA loop {_ms(loop)}, padded {_ms(padded)}", f"{loop / ours:.1f}x / {padded / ours:.1f}x"])
    return rows


def headline_group_topk(run: dict, name: str) -> list[list[str]]:
    threads = max(r["threads"] for r in _field(run, name, "results") if r["device"] == "cpu")
    entry = _pick(run, name, device="cpu", threads=threads, D=768, budget=2048)
    ours, official = entry["op"]["median_ms"], entry["official"]["median_ms"]
    shape = ", ".join(f"{k}={_field(run, name, k)}" for k in ("B", "T", "L"))
    return [["`group_topk`", f"{shape}, D=768, budget 2048", _ms(ours), f"FluxViT's selection {_ms(official)}",
             f"{official / ours:.0f}x"]]


def headline_video_reader(run: dict, name: str) -> list[list[str]]:
    fps: dict[tuple, dict[str, float]] = {}
    for r in _field(run, name, "results"):
        fps.setdefault((r["clip"], r["case"]), {})[r["reader"]] = r["frames_per_s"]
    ratios = [f["pyvidfast"] / max(v for k, v in f.items() if k != "pyvidfast") for f in fps.values()]
    clips = len({clip for clip, _ in fps})
    return [["`VideoReader`", f"{len(fps)} sampling cases on {clips} real clips",
             f"median {statistics.median(ratios):.2f}x the fastest peer", "PyAV, decord, torchcodec",
             f"{min(ratios):.2f}-{max(ratios):.2f}x"]]


def headline_model(run: dict, name: str) -> list[list[str]]:
    rows = []
    for model, clip, variant, family, what in (
        ("ViT-B", "vtest.avi", "RLT packed", "VideoMAE V2 ViT-B", "16 x 224² vtest.avi, RLT keeps {share:.0%}"),
        ("FluxViT-B", "vtest.avi", "budget 2048", "FluxViT-B", "{total} tokens cut to a budget of 2048"),
    ):
        entry = _pick(run, name, model=model, clip=clip, variant=variant)
        ours, full = entry["variant_time"]["median_ms"], entry["full"]["median_ms"]
        rows.append([family, what.format(share=entry["share_kept"], total=entry["all_tokens_per_clip"]), _ms(ours),
                     f"all tokens {_ms(full)}", f"{entry['speedup']:.1f}x"])
    return rows


# The headline, in the README's order: (run, the command that makes it, the rows it gives, what a missing row names).
HEADLINE = [
    ("rlt", "python -m bench.rlt", headline_rlt, "`rlt_tokenize`"),
    ("varlen_attention", "python -m bench.varlen_attention", headline_varlen_attention, "`varlen_attention`"),
    ("group_topk", "python -m bench.group_topk", headline_group_topk, "`group_topk`"),
    ("video_reader", "python -m bench.video_reader", headline_video_reader, "`VideoReader`"),
    ("model", "python -m bench.model --threads 2", headline_model, "VideoMAE V2, FluxViT"),
]


def render_headline(results_dir: Path) -> str:
    rows, used, missing = [], {}, []
    for name, command, make_rows, what in HEADLINE:
        run = load_run(name, results_dir)
        if run is None:
            rows.append([what, "-", "-", f"no committed run: `{command}`", "-"])
            missing.append(name)
            continue
        rows.extend(make_rows(run, name))
        used[name] = run
    lines = ["| what | workload | pyvidfast | best peer / baseline | ratio |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    head = caption(used) if used else ""
    if missing:
        head += ("\n" if head else "") + f"_Not run yet: {', '.join(missing)}; `python -m bench.report` fills them in._"
    return head + "\n\n" + "\n".join(lines)


def render(name: str, results_dir: Path) -> str:
    return render_headline(results_dir) if name == "headline" else render_table(name, results_dir)


def fill(text: str, results_dir: Path) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render(m.group("name"), results_dir) + "\n" + m.group(4), text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a page differs from its runs")
    parser.add_argument("--root", type=Path, default=ROOT, help="checkout whose README.md and docs/*.md to fill")
    parser.add_argument("--results", type=Path, default=None, help="folder of the runs (default ROOT/bench/results)")
    args = parser.parse_args(argv)
    results_dir = args.results or args.root / "bench" / "results"
    stale = []
    try:
        for page in pages(args.root):
            if not page.exists():
                continue
            text = page.read_text()
            filled = fill(text, results_dir)
            if filled != text:
                stale.append(page.relative_to(args.root))
                if not args.check:
                    page.write_text(filled)
    except ReportError as e:
        print(f"bench.report: {e}", file=sys.stderr)
        return 2
    if args.check and stale:
        print("bench.report --check: tables differ from bench/results in " + ", ".join(map(str, stale))
              + "; run `python -m bench.report`", file=sys.stderr)
        return 1
    if args.check:
        print("bench.report --check: every table matches its run")
    else:
        print("filled " + (", ".join(map(str, stale)) if stale else "nothing: every table matches its run"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
