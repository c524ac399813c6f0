"""bench/gpu_check.sh --dry-run: every stage of the GPU check runs here (GPU parts skipped), so the script cannot
fail on a typo the day a GPU is lent. Checks the stages it reports, the JSON and the log it writes, and that the
run's budget stops stages instead of overrunning."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common_gpu import reader_built

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"
STAGES = ["env", "ffmpeg", "build", "tests", "parity", "sanitizer", "nvdec", "bench-attention", "bench-rlt",
          "bench-group-topk", "bench-convert", "bench-model"]


def run_check(out: Path, *args, budget=None, timeout=3600):
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    if budget is not None:
        env["GPU_CHECK_BUDGET_S"] = str(budget)
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-dry-run")
    proc = run_check(out)
    return out, proc


def test_dry_run_goes_through_every_stage(dry_run):
    out, proc = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["dry_run"] is True
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == STAGES
    assert summary["failed_stages"] == [], {s: stages[s]["note"] for s in summary["failed_stages"]}
    # What runs on the CPU must have run; only the GPU-only parts may skip, and they say why.
    must_run = ["env", "build", "tests", "parity", "bench-attention", "bench-rlt", "bench-group-topk", "bench-model"]
    if reader_built():
        must_run += ["nvdec", "bench-convert"]
    for name in must_run:
        assert stages[name]["status"] == "ok", (name, stages[name])
    for s in stages.values():
        assert s["status"] in ("ok", "skipped") and s["seconds"] <= s["budget_s"] + 10
        if s["status"] == "skipped":
            assert s["note"], f"{s['stage']}: a skipped stage names its reason"
    assert "dry run" in stages["sanitizer"]["note"]


def test_dry_run_writes_results_and_log(dry_run):
    out, proc = dry_run
    summary = json.loads((out / "gpu_check.json").read_text())
    stages = {s["stage"]: s for s in summary["stages"]}
    parity = stages["parity"]["result"]
    ops = {case["op"] for case in parity["cases"]}
    assert ops == {"varlen_attention", "rlt", "group_topk"} and parity["failed"] == []
    assert all(case["ok"] for case in parity["cases"])
    attention = stages["bench-attention"]["result"]
    assert {"ours", "padded", "loop"} <= set(attention["results"][0]["paths"])
    assert all("median_ms" in attention["results"][0]["paths"][p] for p in ("ours", "padded", "loop"))
    assert stages["bench-model"]["result"]["results"], "model throughput rows"
    assert stages["env"]["result"]["facts"]["torch"]
    log = (out / "gpu_check.log").read_text()
    for name in STAGES:
        assert f"=== {name} " in log
    assert "| stage | status |" in log and summary["table"] in log
    assert "selected" in (out / "stage-tests.log").read_text()  # pytest collected the CUDA tests


def test_budget_exhausted_skips_stages_and_still_summarizes(tmp_path):
    proc = run_check(tmp_path, "--only", "parity,bench-rlt", budget=12, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(s["stage"], s["status"]) for s in summary["stages"]] == [("parity", "skipped"), ("bench-rlt", "skipped")]
    assert all("no time left" in s["note"] for s in summary["stages"])


def test_unknown_argument_is_refused():
    proc = subprocess.run(["bash", str(SCRIPT), "--bogus"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "unknown argument --bogus" in proc.stderr
