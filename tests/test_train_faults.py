"""Faults in training (issue 16): a rank SIGKILLed mid-checkpoint, SIGTERM, corrupt and truncated checkpoints, a
full disk, broken videos in the list. Each fault is injected for real (signals, truncated files, a 2 MiB tmpfs,
random bytes as a video) except the SIGKILL's timing, which a test hook of the checkpoint writer
(``PYVIDFAST_FAULT``) places between a rank's shard write and the checkpoint's completion."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pyvidfast.train.__main__ import main as train_main
from pyvidfast.train.checkpoint import CheckpointError, export, latest_sharded
from pyvidfast.train.data import BadSampleError
from pyvidfast.train.loop import read_metrics
from test_train_scale import LOSS_TOLERANCE, ROOT, losses, torchrun, vit_args


@pytest.fixture(scope="module")
def killed_run(video_list, tmp_path_factory):
    """A 2-rank FSDP2 run (4 steps, saved every 2) whose rank 1 is SIGKILLed while writing the step-4 checkpoint;
    torchrun's elastic restart (--max-restarts 1) resumes from the step-2 one. Also the uninterrupted losses."""
    folder = tmp_path_factory.mktemp("killed")
    train_main(vit_args(video_list, folder / "whole", "--steps", "4"))
    result = torchrun(2, vit_args(video_list, folder / "run", "--steps", "4", "--save-every", "2", "--fsdp",
                                  "--resume", "auto"), "--max-restarts", "1",
                      env={"PYVIDFAST_FAULT": "kill-in-save:4:1"})
    return folder, result


def test_rank_killed_mid_save_leaves_the_last_checkpoint_and_restart_resumes_exactly(killed_run):
    folder, result = killed_run
    assert "step_00000002 (step 2)" in result.stdout, result.stderr[-4000:]  # the restart resumed from the previous one
    steps = [record["step"] for record in read_metrics(folder / "run")]
    assert steps == [1, 2, 3, 4, 3, 4], steps  # the first attempt logged 3 and 4, then died in the save
    assert losses(folder / "run") == pytest.approx(losses(folder / "whole"), abs=LOSS_TOLERANCE)
    checkpoints = folder / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_00000004"]  # partial and older ones removed


def test_corrupt_and_truncated_checkpoints_are_named(killed_run, video_list, tmp_path):
    folder, _ = killed_run
    run = tmp_path / "run"
    shutil.copytree(folder / "run", run)
    step = latest_sharded(run)
    shard = step / "__0_0.distcp"
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    resume = vit_args(video_list, run, "--steps", "6", "--fsdp", "--resume", "auto")
    with pytest.raises(CheckpointError, match=rf"{shard}.* is truncated"):
        train_main(resume)
    with pytest.raises(CheckpointError, match=rf"{shard}.* is truncated"):
        export(run, tmp_path / "model.safetensors")
    shard.write_bytes(data)
    (step / ".metadata").write_bytes(b"\x80\x04 not a pickle")
    with pytest.raises(CheckpointError, match=rf"cannot read {step / '.metadata'}"):
        train_main(resume)
    # A truncated single-file checkpoint.
    train_main(vit_args(video_list, tmp_path / "pth", "--steps", "1"))
    pth = tmp_path / "pth" / "checkpoint.pth"
    pth.write_bytes(pth.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=rf"cannot read {pth}: it is truncated or corrupt"):
        train_main(vit_args(video_list, tmp_path / "pth", "--steps", "2", "--resume", "auto"))


def test_sigterm_saves_and_exits_cleanly_then_resume_continues(video_list, tmp_path):
    out = tmp_path / "run"
    argv = vit_args(video_list, out, "--steps", "400", "--save-every", "1000")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "pyvidfast.train", *argv], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
        assert child.poll() is None, child.communicate()[1][-4000:]
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    stdout, stderr = child.communicate(timeout=240)
    assert child.returncode == 0, stderr[-4000:]
    done = read_metrics(out)[-1]["step"]
    assert 2 <= done < 400 and f"SIGTERM: saved {out / 'checkpoint.pth'} at step {done}" in stdout, stdout
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == done
    train_main(argv + ["--resume", "auto", "--stop-at", str(done + 2)])
    train_main(vit_args(video_list, tmp_path / "whole", "--steps", "400", "--save-every", "1000", "--stop-at",
                        str(done + 2)))
    assert losses(out) == pytest.approx(losses(tmp_path / "whole"), abs=LOSS_TOLERANCE)


def test_full_disk_fails_clearly_and_leaves_no_partial_checkpoint(video_list, tmp_path):
    """The run folder is a 2 MiB tmpfs (a private mount namespace, ``unshare``): the step-2 checkpoint (1.3 MB)
    fits, the step-4 one does not."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) to mount a private tmpfs")
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k none {tmp_path}"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a private namespace here: {probe.stderr.strip()}")
    out, kept = tmp_path / "disk", tmp_path / "kept"
    out.mkdir()
    argv = " ".join(f"'{a}'" for a in vit_args(video_list, out, "--steps", "4", "--save-every", "2", "--fsdp"))
    script = (f"mount -t tmpfs -o size=2m none {out} && {sys.executable} -m pyvidfast.train {argv}; "
              f"echo rc=$?; ls -A {out}/checkpoints; cp -r {out}/checkpoints {kept}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert "rc=1" in result.stdout, result.stdout + result.stderr[-4000:]
    assert f"checkpoint: writing {out / 'checkpoints' / 'step_00000004'} failed (the disk is full" in result.stderr, (
        result.stderr[-4000:])
    assert "nothing partial is left in place" in result.stderr
    assert result.stdout.split("rc=1")[1].split() == ["step_00000002"], result.stdout  # no partial step 4
    exported = export(kept / "step_00000002", tmp_path / "model.pth")  # the previous checkpoint still loads
    assert torch.load(exported, weights_only=True)


def broken_list(video_list, tmp_path) -> tuple[Path, Path]:
    """19 good videos and one file of random bytes: 5% broken."""
    good = [line for line in video_list.read_text().splitlines() if line.strip()]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(torch.randint(0, 256, (3000,), generator=torch.Generator().manual_seed(0),
                                     dtype=torch.uint8).numpy().tobytes())
    folder = video_list.parent
    lines = [str(folder / line) for line in (good * 3)[:19]]
    lines.insert(7, f"{broken} 1")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing, broken


def test_bad_samples_are_skipped_counted_and_logged_or_fail(video_list, tmp_path, capfd):
    listing, broken = broken_list(video_list, tmp_path)
    # 5 steps of 4 = one epoch of the 20 videos: the broken one is drawn exactly once.
    train_main(vit_args(listing, tmp_path / "skip", "--steps", "5", "--on-bad-sample", "skip"))
    records = read_metrics(tmp_path / "skip")
    assert len(records) == 5 and records[-1]["bad_samples_total"] == 1
    assert sum(r.get("bad_samples", 0) for r in records) == 1
    assert f"skipped a broken video: {broken}" in capfd.readouterr().err
    with pytest.raises(BadSampleError, match=rf"cannot read {broken}.*--on-bad-sample skip"):
        train_main(vit_args(listing, tmp_path / "fail", "--steps", "5"))
