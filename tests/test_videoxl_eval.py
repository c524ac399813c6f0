"""Video-XL evaluation (``python -m pyvidfast.videoxl.eval``): the NIAH harness on a real sample clip with a
needle image written by the test, and the multiple-choice runner on tiny fixtures in the Video-MME and MLVU
layouts; a tiny random model (its replies checked against each question run alone)."""

import json

import numpy as np
import pytest
import torch
from test_videoxl import official_state, randomize, tiny_configs, write_folder

from pyvidfast.models.videoxl import IMAGE_TOKEN_INDEX, VideoXL, load_video
from pyvidfast.videoxl import eval as vxeval
from pyvidfast.videoxl.data import word_tokenizer

LETTERS = ["A", "B", "C", "D"]


def letter_tokenizer(path):
    """Words of the prompts, the option letters and the answer prefix's pieces; 97 entries (the tiny vocab)."""
    words = ["system", "user", "assistant", "You", "are", "a", "helpful", ".", "Best", "option", ":(", ":", ")",
             "Question", "Options", "What", "?", *LETTERS]
    return word_tokenizer(words + [f"w{i}" for i in range(97 - 4 - len(words))], path)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize(VideoXL(*tiny_configs()).float())
    with torch.no_grad():  # lean the head towards the letters, so that replies hold letters and scores vary
        model.lm_head.weight[21:25] *= 3
    path = write_folder(tmp_path_factory.mktemp("vxeval") / "ckpt", model, official_state(model))
    letter_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def model(folder):
    return VideoXL.from_pretrained(folder).eval()


def test_pieces():
    frames = torch.arange(10.0)[:, None, None, None].expand(10, 3, 2, 2)
    needle = torch.full((3, 2, 2), -1.0)
    for depth, at in ((0, 0), (25, 2), (50, 5), (75, 7), (100, 10)):
        out = vxeval.insert_needle(frames, needle, depth)
        assert len(out) == 11 and (out[at] == -1).all() and (out[:at, 0, 0, 0] == torch.arange(at)).all()
    assert vxeval.uniform_indices(5)(101, 25.0) == np.linspace(0, 100, 5, dtype=int).tolist()
    assert vxeval.is_correct("B) reading", "B") and not vxeval.is_correct("C) the B", "B")
    assert not vxeval.is_correct("A", "B")


def test_prompt_and_needle_image(model, tmp_path):
    from PIL import Image

    ids = vxeval.answer_prompt_ids(model.tokenizer, "What ?")
    assert int((ids == IMAGE_TOKEN_INDEX).sum()) == 1
    tail = model.tokenizer.decode(ids[int((ids == IMAGE_TOKEN_INDEX).nonzero()) + 1:].tolist())
    assert tail == "What ? <|im_end|> <|im_start|> assistant Best option :("
    Image.fromarray(np.full((40, 80, 3), (255, 0, 0), dtype=np.uint8)).save(tmp_path / "red.png")
    pixels = vxeval.clip_image(tmp_path / "red.png", 56)
    want = (torch.tensor([1.0, 0.0, 0.0]) - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711])
    assert pixels.shape == (3, 56, 56) and torch.allclose(pixels, want[:, None, None].expand(3, 56, 56), atol=1e-5)


@pytest.fixture(scope="module")
def niah_files(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("niah")
    (root / "needles").mkdir()
    for name, colour in (("cat.png", (250, 200, 10)), ("sky.png", (20, 80, 240))):
        Image.fromarray(np.full((64, 64, 3), colour, dtype=np.uint8)).save(root / "needles" / name)
    qa = {"retrieval_question": ["Question: What ? Options:(A) w1\n(B) w2\n(C) w3\n(D) w4",
                                 "Question: What ? Options:(A) w5\n(B) w6\n(C) w7\n(D) w8"],
          "answer": ["D", "B"], "needle": ["cat.png", "sky.png"]}
    (root / "qa.json").write_text(json.dumps(qa))
    return root


def test_niah_harness(model, niah_files, sample_clips, tmp_path):
    haystack = sample_clips["balle-jbart.mp4"]
    qa = vxeval.read_niah_qa(niah_files / "qa.json", niah_files / "needles")
    results = vxeval.niah(model, model.tokenizer, haystack, qa, [1, 6, 14], depths=(0, 50, 100), ratio=4)
    assert set(results["scores"]) == {"1", "6", "14"}
    # each cell: the fraction of the questions whose reply (alone, greedy) holds the right letter
    frames = load_video(haystack, 56, indices=vxeval.uniform_indices(6))
    for depth in (0, 50, 100):
        correct = 0
        for item, reply in zip(qa, results["replies"]["6"][str(depth)]):
            video = vxeval.insert_needle(frames, vxeval.clip_image(item.image, 56), depth)
            alone = vxeval.greedy_replies(model, model.tokenizer,
                                          [vxeval.answer_prompt_ids(model.tokenizer, item.question)], [video], 4)
            assert alone == [reply]
            correct += vxeval.is_correct(reply, item.answer)
        assert results["scores"]["6"][str(depth)] == correct / 2
    vxeval.niah_heat_map(results, tmp_path / "niah.png")
    assert (tmp_path / "niah.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="1..2048"):
        vxeval.niah(model, model.tokenizer, haystack, qa, [4096])
    bad = niah_files / "bad.json"
    bad.write_text(json.dumps({"retrieval_question": ["q"], "answer": ["A"]}))
    with pytest.raises(ValueError, match="needle"):
        vxeval.read_niah_qa(bad)


@pytest.fixture(scope="module")
def benchmark(video_list, tmp_path_factory):
    """Tiny Video-MME and MLVU fixtures over the sample clips (re-encoded by conftest's ``video_list``)."""
    root = tmp_path_factory.mktemp("mc")
    videos = video_list.parent
    stems = sorted({line.split()[0].rsplit(".", 1)[0] for line in video_list.read_text().splitlines()})
    videomme = [{"videoID": stem, "duration": ["short", "long"][i % 2], "task_type": ["Counting", "OCR"][i // 2],
                 "question": "What ?", "options": [f"{l}. w{i + j}" for j, l in enumerate(LETTERS)],
                 "answer": LETTERS[i % 4]} for i, stem in enumerate(stems)]
    (root / "videomme.json").write_text(json.dumps(videomme))
    (root / "mlvu").mkdir()
    for task, part in (("1_plotQA", stems[:2]), ("2_needle", stems[2:])):
        items = [{"video": f"{stem}.mp4", "question": "What ?", "candidates": ["w1", "w2", "w3"],
                  "answer": ["w1", "w2", "w3"][i % 3], "question_type": task.split("_")[1]}
                 for i, stem in enumerate(part)]
        (root / "mlvu" / f"{task}.json").write_text(json.dumps(items))
    return root, videos


def test_multiple_choice_layouts(model, benchmark):
    root, videos = benchmark
    mme = vxeval.read_questions(root / "videomme.json", "videomme")
    assert mme[1].options == ["w1", "w2", "w3", "w4"] and mme[1].answer == "B"
    assert mme[1].categories == {"duration": "long", "task_type": "Counting"}
    mlvu = vxeval.read_questions(root / "mlvu", "mlvu")
    assert len(mlvu) == 4 and mlvu[1].answer == "B" and mlvu[3].categories == {"question_type": "needle"}
    with pytest.raises(ValueError, match="videomme layout"):
        vxeval.read_questions(root / "mlvu", "videomme")
    results = vxeval.multiple_choice(model, model.tokenizer, videos, mme, frames=5, ratio=4, batch=3)
    assert results["questions"] == 4
    # each reply equals the question run alone; accuracies are the fractions of correct replies
    for q, item in zip(mme, results["items"]):
        clip = load_video(vxeval.find_video(videos, q.video), 56, indices=vxeval.uniform_indices(5))
        ids = vxeval.answer_prompt_ids(model.tokenizer, vxeval.question_text(q))
        assert vxeval.greedy_replies(model, model.tokenizer, [ids], [clip], 4) == [item["reply"]]
        assert item["correct"] == vxeval.is_correct(item["reply"], q.answer)
    correct = [item["correct"] for item in results["items"]]
    assert results["accuracy"] == pytest.approx(np.mean(correct))
    assert results["categories"]["duration"]["short"] == pytest.approx(np.mean(correct[0::2]))
    assert results["categories"]["task_type"]["OCR"] == pytest.approx(np.mean(correct[2:]))


def test_cli(folder, niah_files, benchmark, sample_clips, tmp_path, capsys):
    assert vxeval.main(["niah", "--checkpoint", str(folder), "--haystack", str(sample_clips["bikes.mp4"]),
                        "--qa", str(niah_files / "qa.json"), "--needles", str(niah_files / "needles"),
                        "--frames", "3", "8", "--depths", "0", "100", "--ratio", "4", "--out",
                        str(tmp_path / "niah")]) == 0
    results = json.loads((tmp_path / "niah" / "results.json").read_text())
    assert set(results["scores"]) == {"3", "8"} and (tmp_path / "niah" / "niah.png").is_file()
    root, videos = benchmark
    assert vxeval.main(["mc", "--checkpoint", str(folder), "--videos", str(videos), "--questions",
                        str(root / "mlvu"), "--layout", "mlvu", "--frames", "4", "--ratio", "4", "--out",
                        str(tmp_path / "mlvu")]) == 0
    results = json.loads((tmp_path / "mlvu" / "results.json").read_text())
    assert set(results["categories"]["question_type"]) == {"plotQA", "needle"}
    assert "accuracy:" in capsys.readouterr().out
