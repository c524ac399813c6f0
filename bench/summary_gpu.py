"""The GPU check's summary: one row per stage (status, seconds, budget, headline or why it failed/skipped) and
$OUT/gpu_check.json with every stage's record and the JSON it wrote. Run by bench/gpu_check.sh at its end; exit
status 1 when a stage failed or ran over its budget:

    python -m bench.summary_gpu $OUT/stages.tsv --seconds 412 [--dry-run]
"""

import argparse
import json
import time
from pathlib import Path

from bench.common import machine, markdown_table
from bench.common_gpu import out_dir

# The JSON each stage writes into $OUT (stages without one report through their log only).
STAGE_JSON = {"env": "env", "tests": None, "parity": "parity_gpu", "nvdec": "nvdec",
              "bench-attention": "varlen_attention_gpu", "bench-rlt": "rlt_gpu", "bench-group-topk": "group_topk_gpu",
              "bench-convert": "video_reader_gpu", "bench-model": "model_gpu"}


def pytest_counts(path: Path) -> str:
    """'passed/failed/errors/skipped' from pytest's JUnit XML."""
    import xml.etree.ElementTree as ET

    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    total, failed, errors, skipped = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    return f"{total - failed - errors - skipped} passed, {failed} failed, {errors} errors, {skipped} skipped"


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("stages_tsv", type=Path)
    p.add_argument("--seconds", type=int, required=True)
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    out = out_dir()
    stages = []
    for line in args.stages_tsv.read_text().splitlines():
        name, status, seconds, budget, note = (line.split("\t") + [""] * 5)[:5]
        record = {"stage": name, "status": status, "seconds": int(seconds), "budget_s": int(budget), "note": note}
        json_name = STAGE_JSON.get(name)
        if json_name and (out / f"{json_name}.json").exists():
            record["result"] = json.loads((out / f"{json_name}.json").read_text())
            record["headline"] = record["result"].get("headline", "")
        if name == "tests" and (out / "pytest.xml").exists():
            record["headline"] = pytest_counts(out / "pytest.xml")
        stages.append(record)
    rows = [[s["stage"], s["status"], s["seconds"], s["budget_s"], (s.get("headline") or s["note"])[:110]]
            for s in stages]
    table = markdown_table(["stage", "status", "s", "budget s", "result"], rows)
    bad = [s["stage"] for s in stages if s["status"] in ("failed", "timeout")]
    summary = {"machine": machine(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "dry_run": args.dry_run, "seconds": args.seconds, "stages": stages, "failed_stages": bad,
               "table": table}
    path = out / "gpu_check.json"
    path.write_text(json.dumps(summary, indent=2, default=str))
    print(table)
    print(f"gpu_check{' (dry run)' if args.dry_run else ''}: {len(stages)} stages in {args.seconds} s; "
          f"{len(bad)} failed or over budget{': ' + ', '.join(bad) if bad else ''}; wrote {path}")
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
