"""rlt_mask / rlt_tokenize against an independent float64 reference of the RLT rule."""

import pytest
import torch
import torch.nn.functional as F

from pyvidfast.ops import IMAGENET_MEAN, IMAGENET_STD, PackedTokens, RLTTokenizer, rlt_mask, rlt_tokenize
from pyvidfast.io import decode_frames

from conftest import DEVICES, requires_vector_kernels, run_portable

NEAR = 1e-6  # masks may differ only where |distance - threshold| < NEAR (float rounding at the boundary)


def normalized_float64(video, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Model-layout float64 [B, 3, T, H, W] of a uint8 [B, T, H, W, 3] or floating [B, 3, T, H, W] video."""
    if video.dtype == torch.uint8:
        x = video.double().permute(0, 4, 1, 2, 3) / 255.0
        m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1, 1)
        s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1, 1)
        return (x - m) / s
    return video.double()


def reference(video, tubelet=2, patch=16, threshold=0.1, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """The rule written out directly: distances, keep, run lengths by walking forward, unfolded patches."""
    x = normalized_float64(video, mean, std)
    b, _, t, h, w = x.shape
    tp, hp, wp = t // tubelet, h // patch, w // patch
    distance = torch.full((b, tp, hp, wp), float("inf"), dtype=torch.float64)
    for ti in range(1, tp):
        later = x[:, :, ti * tubelet + tubelet - 1]
        earlier = x[:, :, (ti - 1) * tubelet]
        diff = (later - earlier).abs().reshape(b, 3, hp, patch, wp, patch)
        distance[:, ti] = diff.mean(dim=(1, 3, 5))
    keep = distance > threshold
    keep[:, 0] = True
    lengths = torch.zeros((b, tp, hp, wp), dtype=torch.int32)
    for bi in range(b):
        for hi in range(hp):
            for wi in range(wp):
                for ti in range(tp):
                    if keep[bi, ti, hi, wi]:
                        nxt = ti + 1
                        while nxt < tp and not keep[bi, nxt, hi, wi]:
                            nxt += 1
                        lengths[bi, ti, hi, wi] = nxt - ti
    tokens = x.reshape(b, 3, tp, tubelet, hp, patch, wp, patch).permute(0, 2, 4, 6, 1, 3, 5, 7)
    tokens = tokens.reshape(b, tp, hp, wp, -1)
    return distance, keep, lengths, tokens


def planted_video(b, t, h, w, patch=16, static_share=0.5):
    """Random uint8 video where a random share of patches never changes (planted static regions) and one frame
    repeats the previous one."""
    video = torch.randint(0, 256, (b, t, h, w, 3), dtype=torch.uint8)
    static = torch.rand((b, 1, -(-h // patch), -(-w // patch), 1)) < static_share
    static = static.repeat_interleave(patch, 2).repeat_interleave(patch, 3)[:, :, :h, :w]
    video = torch.where(static, video[:, :1], video)
    if t > 2:
        video[:, t // 2] = video[:, t // 2 - 1]
    return video


def assert_matches_reference(video, tubelet=2, patch=16, threshold=0.1, out_dtype=torch.float32, device="cpu",
                             **kw):
    """Runs both ops on `device` and compares with the float64 reference computed on the CPU."""
    distance, keep_ref, lengths_ref, tokens_ref = reference(video, tubelet, patch, threshold, **kw)
    keep, lengths = rlt_mask(video.to(device), tubelet, patch, threshold, **kw)
    assert keep.device.type == lengths.device.type == torch.device(device).type
    keep, lengths = keep.cpu(), lengths.cpu()
    near = (distance - threshold).abs() < NEAR
    assert keep.shape == keep_ref.shape and keep.dtype == torch.bool and lengths.dtype == torch.int32
    assert torch.all((keep == keep_ref) | near), "mask differs away from the threshold"
    if not near.any():
        assert torch.equal(keep, keep_ref)
        assert torch.equal(lengths, lengths_ref)
    packed = rlt_tokenize(video.to(device), tubelet, patch, threshold, out_dtype=out_dtype, **kw)
    assert all(t.device.type == torch.device(device).type for t in packed)
    packed = PackedTokens(*(t.cpu() for t in packed))
    n = int(keep.sum())
    assert packed.patches.shape == (n, 3 * tubelet * patch * patch) and packed.patches.dtype == out_dtype
    # Tokens of a clip in (t', h', w') raster order, clips in batch order: exactly the order of nonzero(keep).
    idx = keep.nonzero()
    assert torch.equal(packed.positions, idx[:, 1:].int())
    assert torch.equal(packed.lengths, lengths[keep])
    counts = keep.reshape(keep.shape[0], -1).sum(1)
    assert torch.equal(packed.cu_seqlens, F.pad(counts.cumsum(0), (1, 0)).int())
    expected = tokens_ref[idx[:, 0], idx[:, 1], idx[:, 2], idx[:, 3]]
    tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-2, torch.float16: 2e-3}[out_dtype]
    torch.testing.assert_close(packed.patches.double(), expected, rtol=tol, atol=tol)
    return keep, packed


@pytest.mark.parametrize(
    "shape, tubelet, patch",
    [
        ((2, 8, 32, 48), 2, 16),
        ((3, 9, 15, 25), 3, 5),  # odd sizes, tubelet 3
        ((1, 5, 8, 8), 1, 4),  # tubelet 1: consecutive frames
        ((2, 2, 16, 16), 2, 16),  # T' = 1: only the first tubelet
        ((1, 2, 16, 16), 2, 16),  # a single token
        ((2, 16, 64, 32), 2, 16),
    ],
)
@pytest.mark.parametrize("device", DEVICES)
def test_random_video_matches_reference(shape, tubelet, patch, device):
    video = planted_video(*shape, patch=patch)
    keep, _ = assert_matches_reference(video, tubelet, patch, device=device)
    if shape[1] // tubelet > 1:
        assert 0 < keep[:, 1:].float().mean() < 1, "planted regions should give both kept and dropped tokens"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_float_input_matches_reference(dtype, device):
    video = normalized_float64(planted_video(2, 6, 24, 40, patch=8)).to(dtype)
    out_dtype = torch.float32 if dtype != torch.float64 else torch.float64
    assert_matches_reference(video, 2, 8, 0.3, out_dtype=out_dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("out_dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_out_dtypes(out_dtype, device):
    assert_matches_reference(planted_video(2, 4, 32, 32), out_dtype=out_dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_custom_mean_std_and_threshold(device):
    video = planted_video(2, 6, 16, 32, patch=8)
    assert_matches_reference(video, 2, 8, 0.5, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4), device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_real_clips_match_reference(sample_clips, device):
    for name, path in sample_clips.items():
        frames = decode_frames(path, 16, start=0, stride=2, size=(112, 112))
        keep, _ = assert_matches_reference(frames[None], 2, 16, device=device)
        share = keep.float().mean().item()
        assert 1 / 8 <= share <= 1.0, name


def test_uint8_and_float_inputs_give_the_same_tokens(sample_clips):
    video = decode_frames(sample_clips["bikes.mp4"], 8, stride=3, size=(64, 96))[None]
    a = rlt_tokenize(video)
    b = rlt_tokenize(normalized_float64(video).float())
    distance = reference(video)[0]
    assert not ((distance - 0.1).abs() < NEAR).any()
    assert torch.equal(a.positions, b.positions) and torch.equal(a.lengths, b.lengths)
    assert torch.equal(a.cu_seqlens, b.cu_seqlens)
    torch.testing.assert_close(a.patches, b.patches, rtol=1e-6, atol=1e-6)


@requires_vector_kernels
@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_vector_kernels_match_the_portable_and_avx2_kernels(sample_clips, tmp_path, capability):
    """16-pixel patches from uint8 take AVX-512 (with VBMI) or AVX2 paths with explicit shuffles and streaming
    stores, and vector column sums for the mask; the portable kernels and the AVX2 ones (forced in a fresh process)
    must give the same tokens as this process's, up to the one rounding of a fused multiply-add."""
    video = decode_frames(sample_clips["cockatoo.mp4"], 8, stride=2, size=(48, 80))[None]
    video = torch.cat([video, video.flip(2)])
    names = ["float32", "bfloat16", "float16"]
    if capability == "avx2" and torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("this process already runs the AVX2 kernels")
    portable = run_portable(tmp_path, "result = [list(rlt_tokenize(inputs[0], out_dtype=getattr(torch, n))) "
                                      "for n in inputs[1]]", (video, names), capability)
    for name, (patches, positions, lengths, cu_seqlens) in zip(names, portable):
        ours = rlt_tokenize(video, out_dtype=getattr(torch, name))
        assert ours.patches.shape == patches.shape and patches.shape[0] > 0
        assert torch.equal(ours.positions, positions) and torch.equal(ours.lengths, lengths)
        assert torch.equal(ours.cu_seqlens, cu_seqlens)
        ulp = {"float32": 1e-6, "bfloat16": 2**-7, "float16": 2**-10}[name]
        torch.testing.assert_close(ours.patches.float(), patches.float(), rtol=ulp, atol=ulp)


def test_lengths_are_in_token_order_unlike_the_original_code():
    """The original code computes lengths in (b, h, w, t) order while tokens are packed in (b, t, h, w) order.
    Here the two orders differ, and ours matches the token order."""
    video = torch.zeros((1, 8, 32, 32, 3), dtype=torch.uint8)
    video[:, 2:, :16, :16] = 200  # top-left patch: kept at t'=1 (frame 3 vs 0), then static
    video[:, 6:, 16:, 16:] = 200  # bottom-right patch: kept at t'=3 (frame 7 vs 4)
    keep, lengths = rlt_mask(video)
    packed = rlt_tokenize(video)
    # The original ordering: permute to (b, h, w, t), take kept entries.
    original = lengths.permute(0, 2, 3, 1)[keep.permute(0, 2, 3, 1)]
    ours = packed.lengths
    assert not torch.equal(original, ours)
    for (t, h, w), length in zip(packed.positions.tolist(), ours.tolist()):
        assert length == lengths[0, t, h, w]
    # Token order (t', h', w'): four tokens at t'=0 (top-left lasts 1 tubelet, the two untouched ones 4, the
    # bottom-right one 3), the top-left at t'=1 (3 tubelets), the bottom-right at t'=3 (1).
    assert ours.tolist() == [1, 4, 4, 3, 3, 1]
    assert original.tolist() == [1, 3, 4, 4, 3, 1]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16])
def test_224_clips_match_reference(dtype, device, sample_clips):
    # A real clip and a planted one at the size models take.
    video = decode_frames(sample_clips["bikes.mp4"], 16, size=(224, 224))[None].repeat(2, 1, 1, 1, 1)
    video[1] = planted_video(1, 16, 224, 224)[0]
    if dtype != torch.uint8:
        video = normalized_float64(video).to(dtype)
    assert_matches_reference(video, device=device)


def test_negative_threshold_keeps_everything_and_matches_conv3d():
    video = planted_video(2, 4, 32, 48)
    packed = rlt_tokenize(video, threshold=-1.0)
    assert packed.patches.shape[0] == 2 * 2 * 2 * 3
    assert torch.all(packed.lengths == 1)
    conv = torch.nn.Conv3d(3, 24, kernel_size=(2, 16, 16), stride=(2, 16, 16)).double()
    dense = conv(normalized_float64(video))  # [B, D, T', H', W']
    dense = dense.flatten(2).transpose(1, 2).reshape(-1, 24)
    packed_embed = packed.patches.double() @ conv.weight.reshape(24, -1).T + conv.bias
    torch.testing.assert_close(packed_embed, dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 3, 4])
def test_every_schedule_and_thread_count_gives_the_reference(threads):
    # The CPU kernel masks and gathers either one after the other on all threads or side by side, and picks by
    # timing itself (alternating over its first calls, then trying the other schedule every 8th call): 20
    # calls run both, which torch.ops.vidfast._rlt_last_schedule() reports. More threads than cores must not
    # stall the gatherers that wait for published rows.
    video = planted_video(3, 16, 64, 80)  # 96 token rows: several mask chunks and gather claims
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ran = []
        for _ in range(20):
            assert_matches_reference(video)
            ran.append(torch.ops.vidfast._rlt_last_schedule())
        assert set(ran) == {"mask_first", "mask_beside"}, ran
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(2, 8, 64, 64), (1, 16, 224, 224)])  # bound under and over 2 MiB (huge pages)
def test_patches_own_exactly_their_bytes(shape):
    # Patches are written into a buffer sized for every token before the count is known, then trimmed.
    video = planted_video(*shape)
    packed = rlt_tokenize(video)
    bound = shape[0] * shape[1] // 2 * (shape[2] // 16) * (shape[3] // 16)
    assert 0 < packed.patches.shape[0] < bound
    assert packed.patches.untyped_storage().nbytes() == packed.patches.numel() * 4
    assert packed.patches.is_contiguous() and packed.patches.storage_offset() == 0
    # The buffer stays the tensor's until it is freed: another call must not write into it.
    saved = packed.patches.clone()
    rlt_tokenize(planted_video(*shape))
    assert torch.equal(packed.patches, saved)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch_and_noncontiguous_input(device):
    out = rlt_tokenize(torch.zeros((0, 4, 32, 32, 3), dtype=torch.uint8, device=device))
    assert out.patches.shape == (0, 1536) and out.cu_seqlens.tolist() == [0]
    video = planted_video(2, 4, 32, 32).to(device)
    strided = video.transpose(2, 3).contiguous().transpose(2, 3)
    assert not strided.is_contiguous()
    a, b = rlt_tokenize(video), rlt_tokenize(strided)
    assert torch.equal(a.patches, b.patches) and torch.equal(a.positions, b.positions)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: rlt_mask(torch.zeros((1, 4, 32, 32, 3), dtype=torch.int32)), TypeError, "video: expected dtype"),
        (lambda: rlt_mask(torch.zeros((1, 4, 32, 32, 4), dtype=torch.uint8)), ValueError, r"\[B, T, H, W, 3\]"),
        (lambda: rlt_mask(torch.zeros((1, 4, 4, 32, 32))), ValueError, r"\[B, 3, T, H, W\]"),
        (lambda: rlt_mask(torch.zeros((4, 32, 32, 3), dtype=torch.uint8)), ValueError, "5-D"),
        (lambda: rlt_mask(torch.zeros((1, 5, 32, 32, 3), dtype=torch.uint8)), ValueError, "tubelet: must divide"),
        (lambda: rlt_mask(torch.zeros((1, 4, 30, 32, 3), dtype=torch.uint8)), ValueError, "patch: must divide"),
        (lambda: rlt_mask(torch.zeros((1, 4, 32, 32, 3), dtype=torch.uint8), tubelet=0), ValueError, "tubelet"),
        (lambda: rlt_mask(torch.zeros((1, 4, 32, 32, 3), dtype=torch.uint8), threshold=float("nan")), ValueError,
         "threshold"),
        (lambda: rlt_mask(torch.zeros((1, 4, 32, 32, 3), dtype=torch.uint8), mean=(0.5, 0.5)), ValueError, "mean"),
        (lambda: rlt_mask(torch.zeros((1, 4, 32, 32, 3), dtype=torch.uint8), std=(1, 0, 1)), ValueError, "std"),
        (lambda: rlt_tokenize(torch.zeros((1, 4, 32, 32, 3), dtype=torch.uint8), out_dtype=torch.int32), TypeError,
         "out_dtype"),
    ],
)
def test_bad_input_raises_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_gradient_flows_to_float_video():
    video = normalized_float64(planted_video(1, 4, 8, 8))
    video.requires_grad_(True)
    torch.autograd.gradcheck(lambda v: rlt_tokenize(v, 2, 4, 0.3, out_dtype=torch.float64).patches, (video,))
    packed = rlt_tokenize(video, 2, 4, 0.3, out_dtype=torch.float64)
    (packed.patches.sum()).backward()
    # Each pixel of a kept token gets gradient 1, every other pixel 0.
    keep = rlt_mask(video.detach(), 2, 4, 0.3)[0]
    expected = keep[:, :, None, :, None, :, None].expand(1, 2, 2, 2, 4, 2, 4).reshape(1, 4, 8, 8)
    assert torch.equal(video.grad[:, 0], expected.double())


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    video_u8 = planted_video(2, 4, 32, 32).to(device)
    video_f = normalized_float64(planted_video(1, 4, 16, 16)).float().to(device).requires_grad_(True)
    for args in [(video_u8, 2, 16, 0.1, list(IMAGENET_MEAN), list(IMAGENET_STD)),
                 (video_f.detach(), 2, 8, 0.2, [0.0] * 3, [1.0] * 3)]:
        torch.library.opcheck(torch.ops.vidfast.rlt_mask.default, args)
    for args in [(video_u8, 2, 16, 0.1, list(IMAGENET_MEAN), list(IMAGENET_STD), torch.float32),
                 (video_f, 2, 8, 0.2, [0.0] * 3, [1.0] * 3, torch.float32)]:
        torch.library.opcheck(torch.ops.vidfast.rlt_tokenize.default, args)


def test_torch_compile_fullgraph():
    embed = torch.nn.Linear(1536, 32)

    def fn(video):
        packed = rlt_tokenize(video)
        return embed(packed.patches), packed.cu_seqlens

    video = planted_video(2, 4, 32, 32)
    compiled = torch.compile(fn, fullgraph=True, dynamic=True)
    out, cu = compiled(video)
    ref_out, ref_cu = fn(video)
    torch.testing.assert_close(out, ref_out)
    assert torch.equal(cu, ref_cu)


def test_tokenizer_module():
    tok = RLTTokenizer(tubelet=2, patch=8, threshold=0.2)
    video = planted_video(2, 4, 16, 16)
    packed = tok(video)
    ref = rlt_tokenize(video, 2, 8, 0.2)
    assert torch.equal(packed.patches, ref.patches)
    assert packed.max_seqlen() == int((ref.cu_seqlens[1:] - ref.cu_seqlens[:-1]).max())
    assert "threshold=0.2" in repr(tok)
