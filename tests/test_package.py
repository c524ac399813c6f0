"""The package as a user meets it: the library loads, reports how it was built, the CLI and demo work, the set-up
does not trip a newcomer, and the docs show what the committed runs measured."""

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

import pyvidfast
from bench import report
from bench.common import machine
from pyvidfast import demo, samples

ROOT = Path(__file__).resolve().parents[1]


def test_build_info_matches_the_dispatcher():
    info = pyvidfast.build_info()
    dump = torch._C._dispatch_dump("vidfast::rlt_tokenize")
    assert "CPU: registered" in dump
    assert ("CUDA: registered" in dump) == info["cuda_kernels"]
    assert bool(info["cuda_archs"]) == info["cuda_kernels"]
    assert info["torch"] == torch.__version__.split("+")[0]


def test_info_command():
    out = subprocess.run([sys.executable, "-m", "pyvidfast", "info"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert "CUDA kernels built: " in out and "GPU present: " in out and f"torch {torch.__version__}" in out


def test_sample_clips_are_checked(sample_clips):
    for name, path in sample_clips.items():
        assert path.stat().st_size > 100_000
        samples.check(name)


def test_demo_writes_png(tmp_path, capsys):
    class Args:
        clip, out, threshold = "balle-jbart.mp4", str(tmp_path), 0.1
        model, checkpoint, repeats = "videomae_vit_small_patch16_224", None, 1

    demo.main(Args)
    printed = capsys.readouterr().out
    assert "tokens kept:" in printed and "rlt_tokenize:" in printed and "speed-up" in printed
    png = tmp_path / "rlt_balle-jbart.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_rejects_missing_clip(tmp_path):
    import pytest

    with pytest.raises(FileNotFoundError, match="clip"):
        demo.load_clip(str(tmp_path / "missing.mp4"))


# ------------------------------------------------------------------------------------------------- set-up


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_samples_need_no_build(tmp_path, sample_clips):
    """`make samples` runs before `make build`: its recipe does not build, and `python -m pyvidfast samples` works in a
    copy of the package without the compiled library, while the ops say how to build."""
    plan = subprocess.run(["make", "-n", "-s", "samples"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "pyvidfast samples" in plan and "cmake" not in plan
    shutil.copytree(ROOT / "pyvidfast", tmp_path / "pyvidfast", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    cache_root = next(iter(sample_clips.values())).parent.parent
    env = {**_clean_env(), "VIDFAST_CACHE": str(cache_root)}
    out = subprocess.run([sys.executable, "-m", "pyvidfast", "samples"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, check=True).stdout
    assert out.split() == [str(p) for p in sample_clips.values()]
    ops = subprocess.run([sys.executable, "-c", "import pyvidfast.ops"], cwd=tmp_path, env=env, capture_output=True,
                         text=True)
    assert ops.returncode != 0 and "ImportError" in ops.stderr and "make build" in ops.stderr


def test_import_from_another_folder_through_a_path_file(tmp_path):
    """A path file naming the checkout (what `make venv` writes into the venv) is all `import pyvidfast` needs."""
    plan = subprocess.run(["make", "-n", "-s", "venv"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "pyvidfast-checkout.pth" in plan and str(ROOT) in plan
    site = tmp_path / "site"
    site.mkdir()
    (site / "pyvidfast-checkout.pth").write_text(f"{ROOT}\n")
    code = f"import site; site.addsitedir({str(site)!r}); import pyvidfast.ops; print(pyvidfast.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_clean_env(), capture_output=True, text=True,
                         check=True).stdout
    assert Path(out.strip()) == ROOT / "pyvidfast" / "__init__.py"


def test_venv_path_file_imports_from_any_folder(tmp_path):
    path_file = Path(sysconfig.get_path("purelib")) / "pyvidfast-checkout.pth"
    if not path_file.exists():
        pytest.skip("this environment was not set up by `make venv`")
    out = subprocess.run([sys.executable, "-c", "import pyvidfast; print(pyvidfast.__file__)"], cwd=tmp_path,
                         env=_clean_env(), capture_output=True, text=True, check=True).stdout
    assert Path(out.strip()) == Path(path_file.read_text().strip()) / "pyvidfast" / "__init__.py"


# -------------------------------------------------------------------------------------------------- docs


def test_doc_tables_match_their_runs():
    assert report.main(["--check"]) == 0


def test_docs_name_only_existing_python_names():
    """Every dotted `pyvidfast.*` name in README.md and docs/*.md imports or is an attribute of what imports."""
    missing = []
    for page in report.pages():
        for name in sorted(set(re.findall(r"\bpyvidfast(?:\.\w+)+", page.read_text()))):
            parts = name.split(".")
            for split in range(len(parts), 0, -1):
                try:
                    obj = importlib.import_module(".".join(parts[:split]))
                except ModuleNotFoundError:
                    continue
                try:
                    for attr in parts[split:]:
                        obj = getattr(obj, attr)
                except AttributeError:
                    missing.append(f"{page.relative_to(ROOT)}: {name}")
                break
    assert not missing, missing


def test_machine_names_cpu_isa_threads_and_date():
    m = machine()
    assert m["cpu_model"] and m["threads"] == torch.get_num_threads() and m["torch"] == torch.__version__
    assert m["isa"] in ("baseline", "avx2", "avx512", "avx512_bf16")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", m["date"])
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    assert ("avx2" in flags) == ("avx2" in m["isa_flags"])


MACHINE = {"cpu_model": "Test CPU 9000", "isa": "avx512_bf16", "threads": 3, "torch": "2.99.0", "gpu": None,
           "date": "2026-01-02T03:04:05+00:00"}


def _runs() -> dict[str, dict]:
    """Runs shaped as each benchmark writes them (bench/rlt.py, varlen_attention.py, group_topk.py,
    video_reader.py, model.py), with round figures."""
    def t(ms):
        return {"median_ms": ms}

    attention = [{"workload": "rlt-8-clips", "dtype": d, "pass": "fwd+bwd",
                  "paths": {"ours": t(100.0), "loop": t(250.0), "padded": t(400.0)}}
                 for d in ("torch.float32", "torch.bfloat16")]
    topk = [{"device": "cpu", "threads": n, "D": 768, "budget": 2048, "op": t(2.0 * n), "official": t(40.0)}
            for n in (1, 3)]
    reader = [{"clip": c, "case": "16 uniform", "reader": r, "frames_per_s": f}
              for c, fps in (("a.mp4", (300, 100, 150)), ("b.mp4", (200, 50, 50)))
              for r, f in zip(("pyvidfast", "PyAV seek", "decord"), fps)]
    model = [{"model": "ViT-B", "clip": "vtest.avi", "variant": "RLT packed", "share_kept": 0.2,
              "all_tokens_per_clip": 1568, "full": t(2000.0), "variant_time": t(400.0), "speedup": 5.0},
             {"model": "FluxViT-B", "clip": "vtest.avi", "variant": "budget 2048", "share_kept": 0.4,
              "all_tokens_per_clip": 5184, "full": t(9000.0), "variant_time": t(3000.0), "speedup": 3.0}]
    return {
        "rlt": {"shape": [8, 16, 224, 224, 3], "table": "| path | ms |\n|---|---|\n| ours | 0.5 |",
                "results": {"ours_from_uint8": t(0.5), "original_pytorch_from_float": t(50.0)}},
        "varlen_attention": {"results": attention, "table": "| a |\n|---|"},
        "group_topk": {"B": 8, "T": 16, "L": 256, "results": topk, "table": "| g |\n|---|"},
        "video_reader": {"results": reader, "table": "| v |\n|---|"},
        "model": {"results": model, "table": "| m |\n|---|"},
    }


def _checkout(tmp_path: Path, runs: dict[str, dict]) -> Path:
    (tmp_path / "docs").mkdir()
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "README.md").write_text("# x\n\n<!-- table: headline -->\nold\n<!-- end table -->\n\ntext\n")
    (tmp_path / "docs" / "rlt.md").write_text("a\n<!-- table: rlt -->\n<!-- end table -->\nb\n")
    for name, run in runs.items():
        (tmp_path / "bench" / "results" / f"{name}.json").write_text(json.dumps({"machine": MACHINE, **run}))
    return tmp_path


def test_report_fills_tables_from_runs_and_check_sees_changes(tmp_path):
    root = _checkout(tmp_path, _runs())
    assert report.main(["--root", str(root), "--check"]) == 1
    assert report.main(["--root", str(root)]) == 0
    page = (root / "docs" / "rlt.md").read_text()
    assert page == ("a\n<!-- table: rlt -->\n_Run on Test CPU 9000, avx512_bf16, 3 threads, torch 2.99.0, "
                    "2026-01-02T03:04:05+00:00: `bench/results/rlt.json`._\n\n"
                    "| path | ms |\n|---|---|\n| ours | 0.5 |\n<!-- end table -->\nb\n")
    assert report.main(["--root", str(root), "--check"]) == 0
    run = json.loads((root / "bench" / "results" / "rlt.json").read_text())
    run["table"] = run["table"].replace("0.5", "0.6")
    (root / "bench" / "results" / "rlt.json").write_text(json.dumps(run))
    assert report.main(["--root", str(root), "--check"]) == 1


def test_headline_rows_come_from_the_runs(tmp_path):
    root = _checkout(tmp_path, _runs())
    report.main(["--root", str(root)])
    readme = (root / "README.md").read_text()
    rows = {line.split(" | ")[0].strip("| "): line for line in readme.splitlines() if line.startswith("| ")}
    assert "| 0.5 ms | RLT's PyTorch ops 50 ms | 100x |" in rows["`rlt_tokenize`"]
    assert "| 100 ms | SDPA loop 250 ms, padded 400 ms | 2.5x / 4.0x |" in readme
    assert "D=768, budget 2048 | 6 ms | FluxViT's selection 40 ms | 7x |" in rows["`group_topk`"]  # all threads
    assert "median 3.00x the fastest peer | PyAV, decord, torchcodec | 2.00-4.00x |" in rows["`VideoReader`"]
    assert "RLT keeps 20% | 400 ms | all tokens 2,000 ms | 5.0x |" in rows["VideoMAE V2 ViT-B"]
    assert "5184 tokens cut to a budget of 2048 | 3,000 ms | all tokens 9,000 ms | 3.0x |" in rows["FluxViT-B"]
    assert "Test CPU 9000, avx512_bf16, 3 threads, torch 2.99.0" in readme and "\ntext\n" in readme


def test_report_without_a_run_says_how_to_make_one_and_names_a_run_without_table(tmp_path, capsys):
    runs = _runs()
    del runs["model"]
    runs["rlt"].pop("table")
    root = _checkout(tmp_path, runs)
    (root / "docs" / "rlt.md").write_text("<!-- table: rlt -->\n<!-- end table -->\n")
    assert report.main(["--root", str(root)]) == 2
    assert "rlt.json: no \"table\" key" in capsys.readouterr().err
    (root / "docs" / "rlt.md").unlink()
    assert report.main(["--root", str(root)]) == 0
    readme = (root / "README.md").read_text()
    assert "no committed run: `python -m bench.model --threads 2`" in readme and "_Not run yet: model;" in readme
