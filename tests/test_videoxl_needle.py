"""The needle task at tiny size (bench/videoxl_needle.py): a small Video-XL trained briefly on haystacks of the
real sample clips finds the needle's colour well above chance, only through the VST memory (removed, the
accuracy returns to chance)."""

import pytest
import torch

from bench import videoxl_needle as needle


@pytest.fixture(scope="module")
def setup(sample_clips):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # oversubscribed cores: threads only wait on each other
    tokenizer = needle.task_tokenizer()
    pool = needle.haystack_pool([str(p) for _, p in sorted(sample_clips.items())], frames_per_clip=8)
    model = needle.small_videoxl(len(tokenizer))
    yield model, pool, tokenizer
    torch.set_num_threads(threads)


def test_haystack_and_sample(setup):
    model, pool, tokenizer = setup
    g = torch.Generator().manual_seed(0)
    hay = needle.make_needle(pool, 10, 0.5, "blue", g)
    assert hay.frames.shape == (11, 3, 56, 56)
    assert torch.equal(hay.frames[5], needle.needle_frame("blue"))
    sample = needle.training_sample(hay, tokenizer, 0)
    labelled = sample.labels[sample.labels != -100].tolist()
    assert labelled == tokenizer.convert_tokens_to_ids(["blue", "<|im_end|>"])  # one-token answer + end
    ids = needle.prompt_ids(tokenizer)
    assert torch.equal(ids, sample.input_ids[:len(ids)]) and sample.input_ids[len(ids)] == labelled[0]


def test_short_training_finds_the_needle_through_the_memory(setup):
    model, pool, tokenizer = setup
    needle.train(model, pool, tokenizer, steps=120, batch=8, lengths=(3, 7))  # ratios 2, 4, 8
    chance = 1 / len(needle.COLOURS)
    depths = (0.0, 0.5, 1.0)
    # 3x the longest training haystack, at ratio 16
    with_memory = [needle.accuracy(model, pool, tokenizer, 23, d, 16, 16) for d in depths]
    without = [needle.accuracy(model, pool, tokenizer, 23, d, 16, 16, keep_vsts=False) for d in depths]
    assert sum(with_memory) / 3 >= chance + 0.2, with_memory
    assert abs(sum(without) / 3 - chance) <= 0.1, without
