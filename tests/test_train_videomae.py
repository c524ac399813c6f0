"""VideoMAE V2 pretraining task: dual masks, pixel targets and the loss against independent references."""

import pytest
import torch

from pyvidfast.ops import IMAGENET_MEAN, IMAGENET_STD
from pyvidfast.train.tasks.videomae import dual_masks, pretrain_loss, pretrain_targets, running_cell_mask, tube_mask


@pytest.mark.parametrize("grid,ratio", [((8, 14, 14), 0.9), ((8, 16, 16), 0.9), ((3, 5, 7), 0.75), ((1, 1, 1), 0.5)])
def test_tube_mask_exact_ratio_and_tubes(grid, ratio):
    frames, height, width = grid
    mask = tube_mask(grid, ratio, torch.Generator().manual_seed(1))
    assert mask.shape == (frames, height * width) and mask.dtype == torch.bool
    assert (mask.sum(1) == int(ratio * height * width)).all()
    assert (mask == mask[0]).all()  # the same cells in every frame: tubes


def test_tube_mask_is_random_and_reproducible():
    draw = [tube_mask((8, 14, 14), 0.9, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(draw[0], draw[1])
    assert not torch.equal(draw[0], draw[2])
    assert tube_mask((8, 14, 14), 0.9).sum() == 8 * 176  # 20 visible per frame, 160 in all (ViT-B at 224)


def test_running_cell_pattern():
    # Cells at start 0, derived by hand from the official Cell: pointer start + t + 1 rotates [1, 1, 0, 0].
    expected = torch.tensor([[[1, 0], [0, 1]], [[0, 0], [1, 1]], [[0, 1], [1, 0]], [[1, 1], [0, 0]]], dtype=torch.bool)
    mask = running_cell_mask((8, 14, 14), 0.5, start=0).view(8, 14, 14)
    rows, cols = torch.arange(14)[:, None] % 2, torch.arange(14)[None, :] % 2
    for t in range(8):
        assert torch.equal(mask[t], expected[t % 4][rows, cols]), t
    assert (mask.view(8, -1).sum(1) == 98).all()  # exactly half of every frame
    # Every position is kept by the decoder in 2 of any 4 consecutive temporal tokens.
    for t in range(5):
        assert ((~mask[t:t + 4]).sum(0) == 2).all()


def test_running_cell_has_four_maps_and_other_ratios():
    maps = {running_cell_mask((4, 4, 4), 0.5, generator=torch.Generator().manual_seed(s)).numpy().tobytes()
            for s in range(40)}
    assert len(maps) == 4
    shifted = [running_cell_mask((4, 4, 4), 0.5, start=s) for s in range(4)]
    assert torch.equal(shifted[1][:3], shifted[0][1:])  # start + 1 = one step later
    assert (running_cell_mask((2, 4, 6), 0.25, start=2).sum(1) == 6).all()
    assert (running_cell_mask((2, 4, 6), 0.75, start=1).sum(1) == 18).all()


def test_running_cell_bad_input():
    with pytest.raises(ValueError, match="grid"):
        running_cell_mask((2, 3, 4))
    with pytest.raises(ValueError, match="ratio"):
        running_cell_mask((2, 4, 4), 0.1)


def test_dual_masks_batch():
    mask, decode_mask = dual_masks([3, 4, 3], (8, 14, 14))
    assert mask.shape == decode_mask.shape == (3, 1568)
    assert torch.equal(mask[0], mask[2]) and torch.equal(decode_mask[0], decode_mask[2])
    assert (mask.sum(1) == 1408).all() and (decode_mask.sum(1) == 784).all()
    assert dual_masks([0], (2, 4, 4), 0.5, 0.0)[1] is None


def _reference_targets(video, tubelet, patch):
    """Float64 loop over patches and channels: standardise each patch's pixels in [0, 1] units."""
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(3, 1, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(3, 1, 1, 1)
    batch, _, frames, height, width = video.shape
    out = []
    for b in range(batch):
        pixels = video[b].double() * std + mean
        tokens = []
        for t in range(0, frames, tubelet):
            for h in range(0, height, patch):
                for w in range(0, width, patch):
                    cube = pixels[:, t:t + tubelet, h:h + patch, w:w + patch].reshape(3, -1)  # [c, (dt ph pw)]
                    cube = (cube - cube.mean(1, keepdim=True)) / (cube.std(1, keepdim=True) + 1e-6)
                    tokens.append(cube.T.reshape(-1))  # channel last, as the official rearrange
        out.append(torch.stack(tokens))
    return torch.stack(out)


def test_pretrain_targets_against_loop():
    video = torch.randn(2, 3, 4, 8, 12)
    got = pretrain_targets(video, 2, 4, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(got.double(), _reference_targets(video, 2, 4), atol=2e-5, rtol=1e-5)


def test_loss_only_on_encoder_masked_decoder_kept_tokens():
    grid, batch = (2, 2, 4), 2
    video = torch.randn(batch, 3, 4, 8, 16)
    mask, decode_mask = dual_masks([5, 6], grid, mask_ratio=0.5, decoder_mask_ratio=0.5)
    targets = _reference_targets(video, 2, 4)
    kept = ~decode_mask
    pred = torch.randn(batch, int(kept[0].sum()), 96)
    computed = pretrain_targets(video, 2, 4, IMAGENET_MEAN, IMAGENET_STD)
    loss = pretrain_loss(pred, computed, mask, decode_mask)
    # Independent sum over the tokens that are hidden from the encoder and kept by the decoder.
    total, count = 0.0, 0
    for b in range(batch):
        for slot, token in enumerate(torch.nonzero(kept[b]).flatten().tolist()):
            if mask[b, token]:
                total += float((pred[b, slot].double() - targets[b, token]).pow(2).mean())
                count += 1
    assert count > 0
    assert abs(float(loss) - total / count) < 1e-5
    # Changing the predictions of encoder-visible tokens leaves the loss alone; changing a counted one moves it.
    visible_slots = ~mask[kept].view(batch, -1)
    assert visible_slots.any()
    moved = pred.clone()
    moved[visible_slots] += 10.0
    assert float(pretrain_loss(moved, computed, mask, decode_mask)) == pytest.approx(float(loss))
    moved = pred.clone()
    moved[~visible_slots] += 10.0
    assert float(pretrain_loss(moved, computed, mask, decode_mask)) > float(loss) + 1.0


def test_v1_loss_decodes_every_masked_token():
    """decoder mask ratio 0 (VideoMAE V1): the decoder predicts exactly the encoder-masked tokens, all counted."""
    video = torch.randn(2, 3, 4, 8, 16)
    mask, decode_mask = dual_masks([1, 2], (2, 2, 4), mask_ratio=0.75, decoder_mask_ratio=0.0)
    assert decode_mask is None
    targets = _reference_targets(video, 2, 4)
    pred = torch.randn(2, int(mask[0].sum()), 96)
    loss = pretrain_loss(pred, pretrain_targets(video, 2, 4, IMAGENET_MEAN, IMAGENET_STD), mask, None)
    expected = torch.stack([(pred[b].double() - targets[b][mask[b]]).pow(2).mean() for b in range(2)]).mean()
    assert float(loss) == pytest.approx(float(expected), abs=1e-5)
