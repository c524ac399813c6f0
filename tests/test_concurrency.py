"""Threads and processes: every op from 8 Python threads at once equals serial calls (the RLT schedule chooser and
the recycled output blocks are process-wide state), one VideoReader per thread, readers in DataLoader workers
(fork and spawn) give exact frames, and a killed worker is an error, not a hang."""

import shutil
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import pyvidfast
from pyvidfast.io import VideoDataset, VideoReader, sampling
from pyvidfast.io.dataset import DenseClips
from pyvidfast.ops import group_topk, rlt_mask, rlt_tokenize, varlen_attention

THREADS = 8
needs_reader = pytest.mark.skipif(
    shutil.which("ffmpeg") is None or not pyvidfast.build_info()["video_reader"],
    reason="needs the ffmpeg CLI and a build with the reader")


def run_threads(work, count=THREADS):
    """Runs work(i) for i < count in threads that start together; returns the results in order, re-raising the
    first exception."""
    barrier = threading.Barrier(count)
    results, errors = [None] * count, []

    def body(i):
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as e:  # noqa: BLE001 (re-raised below)
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
        assert not t.is_alive(), "a thread hangs"
    if errors:
        raise errors[0]
    return results


def assert_same(a, b, what):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), what
    else:
        assert len(a) == len(b), what
        for x, y in zip(a, b):
            assert_same(x, y, what)


def planted_video(seed, b=2, t=8, h=64, w=96):
    """uint8 [B, T, H, W, 3] where half the 16-pixel patches never change (both kept and dropped tokens)."""
    g = torch.Generator().manual_seed(seed)
    video = torch.randint(0, 256, (b, t, h, w, 3), generator=g, dtype=torch.uint8)
    static = (torch.rand((b, 1, h // 16, w // 16, 1), generator=g) < 0.5)
    static = static.repeat_interleave(16, 2).repeat_interleave(16, 3)
    return torch.where(static, video[:, :1], video)


def attention_with_grads(q, k, v, cu, max_len, causal):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = varlen_attention(*leaves, cu, cu, max_len, max_len, causal=causal)
    out.backward(torch.ones_like(out))
    return out.detach(), *(t.grad for t in leaves)


def op_cases():
    """(name, callable of a per-thread seed) for every op, on inputs that differ per thread."""

    def rlt_uint8(seed):
        return tuple(rlt_tokenize(planted_video(seed)))

    def rlt_float(seed):
        video = planted_video(seed).permute(0, 4, 1, 2, 3).float().div(255)
        return tuple(rlt_tokenize(video, 2, 16, 0.2, out_dtype=torch.bfloat16))

    def mask(seed):
        return rlt_mask(planted_video(seed, t=6), tubelet=3, patch=8)

    def topk(seed):
        x = torch.randn(3, 8, 50, 40, generator=torch.Generator().manual_seed(seed))
        return group_topk(x, 4, 77, return_scores=True)

    def attention(seed):
        g = torch.Generator().manual_seed(seed)
        lengths = [int(n) for n in torch.randint(0, 300, (3,), generator=g)]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        q, k, v = (torch.randn(sum(lengths), 4, 32, generator=g) for _ in range(3))
        return attention_with_grads(q, k, v, cu, max(lengths), causal=seed % 2 == 1)

    return {"rlt_tokenize_uint8": rlt_uint8, "rlt_tokenize_float": rlt_float, "rlt_mask": mask,
            "group_topk": topk, "varlen_attention": attention}


@pytest.mark.parametrize("name", list(op_cases()))
def test_ops_from_threads_equal_serial_calls(name):
    op = op_cases()[name]
    expected = [op(seed) for seed in range(THREADS)]
    repeats = 3

    def work(i):
        return [op(i) for _ in range(repeats)]

    for i, results in enumerate(run_threads(work)):
        for got in results:
            assert_same(got, expected[i], f"{name}: thread {i} differs from its serial call")


def test_rlt_schedule_chooser_and_report_per_thread():
    """The schedule chooser learns from every thread's calls at once (both schedules keep being tried, results
    exact), and _rlt_last_schedule() reports the calling thread's own last schedule ("none" in a thread that
    never tokenized). The outputs are over 2 MiB, so they come from the recycled huge-page blocks: no two live
    outputs of the threads may share memory."""
    videos = [planted_video(seed, b=2, t=8, h=192, w=192) for seed in range(THREADS)]
    expected = [rlt_tokenize(v).patches for v in videos]
    tokens = 2 * 4 * 12 * 12  # the output buffer holds every token before the kept ones are counted
    assert tokens * 768 * 4 > 2 << 20

    def work(i):
        ran, outputs = [], []
        for _ in range(12):
            packed = rlt_tokenize(videos[i])
            ran.append(torch.ops.vidfast._rlt_last_schedule())
            outputs.append(packed.patches)
        return ran, outputs

    results = run_threads(work)
    spans = []
    for i, (ran, outputs) in enumerate(results):
        assert set(ran) <= {"mask_first", "mask_beside"}, ran
        for out in outputs:
            assert torch.equal(out, expected[i])
            spans.append((out.data_ptr(), out.data_ptr() + out.numel() * out.element_size()))
    assert {s for ran, _ in results for s in ran} == {"mask_first", "mask_beside"}
    spans.sort()
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), "two live outputs overlap"
    assert run_threads(lambda i: torch.ops.vidfast._rlt_last_schedule(), 2) == ["none", "none"]


# ---- readers ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two small H.264 clips with B-frames (48 and 30 frames) and a list file naming each twice."""
    folder = tmp_path_factory.mktemp("concurrency")
    paths = []
    for name, size, seconds in [("a.mp4", "64x48", 1.92), ("b.mp4", "80x64", 1.2)]:
        path = folder / name
        subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                        f"testsrc2=size={size}:rate=25:duration={seconds}", "-c:v", "libx264", "-bf", "2", "-g",
                        "10", "-pix_fmt", "yuv420p", str(path)], check=True, capture_output=True)
        paths.append(path)
    (folder / "list.txt").write_text("".join(f"{p.name} {i}\n" for i, p in enumerate(paths * 2)))
    return paths, folder / "list.txt"


@needs_reader
def test_one_reader_per_thread(clips):
    paths, _ = clips

    def read(i):
        with VideoReader(paths[i % 2], threads=1) as r:
            n = len(r)
            indices = [(i * 7 + j * 5) % n for j in range(12)]
            return indices, r.get_frames(indices)

    serial = [read(i) for i in range(THREADS)]
    for i, (indices, frames) in enumerate(run_threads(read)):
        assert indices == serial[i][0] and torch.equal(frames, serial[i][1]), f"thread {i}"


@needs_reader
@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_readers_in_dataloader_workers(clips, context):
    paths, list_file = clips
    dataset = VideoDataset(list_file, sampler=DenseClips(clip_len=4, stride=3), size=(32, 32))
    workers = 2 if context == "fork" else 1  # a spawned worker imports torch afresh: one is enough to prove it
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=workers, multiprocessing_context=context)
    got = [(clip[0], int(label)) for clip, label in loader]
    assert [label for _, label in got] == [0, 1, 2, 3]
    # The same items read in this process: the sampler's random start comes from the worker's seeded generator,
    # so compare with every start and require an exact match.
    for (clip, label), path in zip(got, paths * 2):
        with VideoReader(path) as r:
            candidates = [r.get_frames(sampling.dense(len(r), 4, 3, start=s), size=(32, 32), layout="CTHW",
                                       dtype=torch.float32, mean=dataset.mean, std=dataset.std)
                          for s in range(len(r) - 9)]
        assert any(torch.equal(clip, c) for c in candidates), f"item {label}: no exact match"


@needs_reader
def test_killed_worker_raises_instead_of_hanging(clips, tmp_path):
    """A worker killed with SIGKILL in the middle of reading: the loader raises within its timeout (in a child
    process, so a hang fails this test instead of the suite)."""
    _, list_file = clips
    script = textwrap.dedent(f"""
        import os, signal, torch
        from pyvidfast.io import VideoDataset
        from pyvidfast.io.dataset import DenseClips

        class Dying(VideoDataset):
            def __getitem__(self, i):
                item = super().__getitem__(i)
                if i == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
                return item

        loader = torch.utils.data.DataLoader(Dying({str(list_file)!r}, sampler=DenseClips(4, 2), size=(16, 16)),
                                             num_workers=1, multiprocessing_context="fork", timeout=60)
        try:
            for _ in loader:
                pass
        except RuntimeError as e:
            print("raised:", e)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "raised:" in done.stdout, done.stderr
    assert "killed by signal" in done.stdout or "exited unexpectedly" in done.stdout, done.stdout
