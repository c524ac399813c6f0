"""The one video dataset (pyvidfast.io.dataset): list-file grammar, samplers, crops, seeded training items, and the
training clips built on it."""

import pytest
import torch

from pyvidfast.io import DenseClips, VideoDataset, VideoReader, read_list_file, sampling
from pyvidfast.io.dataset import crop_offsets, short_side_size
from pyvidfast.ops import IMAGENET_MEAN, IMAGENET_STD
from pyvidfast.train.data import SLOTS, TrainingClips, sample_seed


def test_list_file_grammar(tmp_path):
    (tmp_path / "sub").mkdir()
    lst = tmp_path / "sub" / "list.txt"
    lst.write_text("# header\n\na.mp4 3\n  my clip.mp4 -1 \nno label.mp4\n/abs/b.mp4 7\nclip 2.mp4\n")
    assert read_list_file(lst) == [(str(tmp_path / "sub" / "a.mp4"), 3), (str(tmp_path / "sub" / "my clip.mp4"), -1),
                                   (str(tmp_path / "sub" / "no label.mp4"), -1), ("/abs/b.mp4", 7),
                                   (str(tmp_path / "sub" / "clip 2.mp4"), -1)]
    assert read_list_file(lst, root="/data")[0] == ("/data/a.mp4", 3)
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="lists no videos"):
        read_list_file(tmp_path / "empty.txt")


def test_crop_geometry():
    assert short_side_size(72, 96, 64) == (64, 85) and short_side_size(96, 72, 64) == (85, 64)
    assert short_side_size(100, 100, 64) == (64, 64)
    assert crop_offsets(85, 64, 1) == [10] and crop_offsets(85, 64, 3) == [0, 10, 21]


def test_dense_clips_sampler(sample_clips):
    with VideoReader(sample_clips["bikes.mp4"]) as reader:
        n = len(reader)
        one = DenseClips(8, 3)(reader, generator=torch.Generator().manual_seed(5))
        assert one == sampling.dense(n, 8, 3, generator=torch.Generator().manual_seed(5))
        assert DenseClips(8, 3, num_clips=4)(reader) == sampling.dense_views(n, 8, 3, 4)


def test_views_and_crops_equal_the_reader(video_list):
    """Eval views: clips x crops of frames resized (short side) and normalized in the reader, then cropped."""
    dataset = VideoDataset(video_list, DenseClips(4, 2, num_clips=2), size=64, crop=56, num_crops=3)
    views, label = dataset[1]
    path, expected_label = dataset.items[1]
    assert views.shape == (6, 3, 4, 56, 56) and label == expected_label
    with VideoReader(path) as reader:
        clips = sampling.dense_views(len(reader), 4, 2, 2)
        frames = reader.get_frames(clips[1], size=(64, 85), layout="CTHW", dtype=torch.float32, mean=IMAGENET_MEAN,
                                   std=IMAGENET_STD)
    for crop, left in enumerate(crop_offsets(85, 56, 3)):
        assert torch.equal(views[3 + crop], frames[:, :, 4:60, left:left + 56])
    thwc = VideoDataset(video_list, DenseClips(4, 2, num_clips=2), size=64, crop=56, layout="THWC", dtype=torch.uint8)
    assert thwc[1][0].shape == (2, 4, 56, 56, 3) and thwc[1][0].dtype == torch.uint8
    with pytest.raises(ValueError, match="crop"):
        VideoDataset(video_list, DenseClips(4, 2), size=(32, 48), crop=40)[0]


def test_seeded_items_are_reproducible(video_list):
    dataset = VideoDataset(video_list, DenseClips(4, 2), size=64, crop=48)
    a, b, c = dataset[(2, 11)][0], dataset[(2, 11)][0], dataset[(2, 12)][0]
    assert a.shape == (3, 4, 48, 48) and torch.equal(a, b) and not torch.equal(a, c)
    # The seed's generator draws the start, then the crop's top and left.
    g = torch.Generator().manual_seed(11)
    with VideoReader(dataset.items[2][0]) as reader:
        indices = sampling.dense(len(reader), 4, 2, generator=g)
        frames = reader.get_frames(indices, size=(64, 85), layout="CTHW", dtype=torch.float32, mean=IMAGENET_MEAN,
                                   std=IMAGENET_STD)
    top, left = int(torch.randint(64 - 48 + 1, (1,), generator=g)), int(torch.randint(85 - 48 + 1, (1,), generator=g))
    assert torch.equal(a, frames[:, :, top:top + 48, left:left + 48])


def test_training_clips_share_the_step_shape(video_list):
    videos = VideoDataset(video_list, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    fixed = TrainingClips(videos, 2, (4, 48))
    clip, label, seed = fixed[(3, 77)]
    assert clip.shape == (3, 4, 48, 48) and (label, seed) == (videos.items[3][1], 77)
    assert clip.min() >= -1 and clip.max() <= 1 and clip.min() < -0.5  # normalized with the given mean and std

    def draw(generator):
        return [(2, 32), (4, 48), (6, 64)][int(torch.randint(3, (1,), generator=generator))]

    flexi = TrainingClips(videos, 1, draw)
    shapes = {step: {flexi[(i, sample_seed(0, step, i))][0].shape for i in range(3)} for step in range(6)}
    assert all(len(s) == 1 for s in shapes.values())  # one shape per step
    assert len(set.union(*shapes.values())) > 1  # drawn afresh per step
    assert flexi.shape(sample_seed(0, 4, 1)) == flexi.shape(sample_seed(0, 4, SLOTS - 1))
