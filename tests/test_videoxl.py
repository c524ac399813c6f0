"""Video-XL: tiny Qwen2 + CLIP configs in float64 on the CPU, checked against HF Qwen2 and against an independent
reference that runs the whole interleaved sequence in one pass with explicit visible sets."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig, Qwen2ForCausalLM

from pyvidfast.models import create_model
from pyvidfast.models.videoxl import (CLIP_MEAN, CLIP_STD, IMAGE_TOKEN_INDEX, CLIPTower, VideoXL,
                                      chat_input_ids, interleave_layout, load_video, official_to_ours,
                                      qwen2_7b_config)

VOCAB = 97
WINDOW = 48  # 12 frames of 4 tokens: the tiny analogue of 1440 = 10 frames of 144
TOKENS = 4


def tiny_configs(**overrides):
    cfg = qwen2_7b_config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                          beacon_window=WINDOW, beacon_stride=WINDOW, mm_hidden_size=24, eos_token_id=3,
                          bos_token_id=None, **overrides)
    vision = CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                              image_size=56, patch_size=14, hidden_act="quick_gelu")
    return cfg, vision


def randomize(model):
    """Fresh random values everywhere (biases and norms included), so no parameter hides behind its init."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        for name, p in model.named_parameters():
            if "layernorm" in name or "norm.weight" in name or "layer_norm" in name:
                p.add_(1.0)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny tensors gain nothing from threads, and on a busy machine waiting for them dominates."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomize(VideoXL(*tiny_configs()).double().eval())


def video(frames, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(frames, 3, 56, 56, generator=g, dtype=torch.float64)


def prompt(prefix, suffix, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    return torch.cat([torch.randint(4, VOCAB, (prefix,), generator=g), torch.tensor([IMAGE_TOKEN_INDEX]),
                      torch.randint(4, VOCAB, (suffix,), generator=g)])


# ------------------------------------------------------------------------------------ the independent reference


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def reference_run(model, ids, feats, ratios):
    """The whole sequence in one pass: every slot (sink, raw, VST, text) attends exactly its visible set, keys at
    their rank inside it. Returns logits of the text slots and the video's last raw slot, and per layer the
    pre-RoPE keys/values of the slots the memory keeps (sink, VSTs, text)."""
    lm = model.model
    where = int((ids == IMAGE_TOKEN_INDEX).nonzero())
    prefix, suffix = ids[:where], ids[where + 1:]
    kind, window_of, embeds = [], [], []
    for t in prefix:
        kind.append("sink"), window_of.append(-1), embeds.append(lm.embed_tokens.weight[t])
    carry = 0
    for w, start in enumerate(range(0, len(feats), WINDOW)):
        r = ratios[w]
        for row in feats[start:start + WINDOW]:
            kind.append("raw"), window_of.append(w), embeds.append(row)
            carry += 1
            if carry == r:
                kind.append("vst"), window_of.append(w), embeds.append(lm.beacon_embed_tokens.weight[0])
                carry = 0
        carry = 0 if len(feats[start:start + WINDOW]) % r == 0 else carry
    for t in suffix:
        kind.append("text"), window_of.append(10 ** 9), embeds.append(lm.embed_tokens.weight[t])
    n = len(kind)

    def visible(t):
        if kind[t] == "sink":
            return [j for j in range(t + 1)]
        if kind[t] == "text":
            return [j for j in range(t + 1) if kind[j] in ("sink", "vst", "text")]
        return [j for j in range(t + 1) if kind[j] == "sink" or (kind[j] == "vst" and window_of[j] < window_of[t])
                or window_of[j] == window_of[t]]

    sets = [visible(t) for t in range(n)]
    h = torch.stack(embeds)
    cos_all, sin_all = (c[0, :, None] for c in lm.rotary_emb(h, torch.arange(n)[None]))  # HF's RoPE table
    is_vst = torch.tensor([k == "vst" for k in kind])
    kept_k, kept_v = [], []
    for layer in lm.layers:
        a = layer.self_attn
        x = layer.input_layernorm(h)
        q = torch.where(is_vst[:, None], a.beacon_q_proj(x), a.q_proj(x)).view(n, -1, a.head_dim)
        k = torch.where(is_vst[:, None], a.beacon_k_proj(x), a.k_proj(x)).view(n, -1, a.head_dim)
        v = torch.where(is_vst[:, None], a.beacon_v_proj(x), a.v_proj(x)).view(n, -1, a.head_dim)
        groups = q.shape[1] // k.shape[1]
        out = torch.zeros_like(q)
        for t in range(n):
            js = sets[t]
            cos, sin = cos_all[:len(js)], sin_all[:len(js)]  # keys at their ranks in the visible set
            keys = rotate(k[js], cos, sin).repeat_interleave(groups, 1)
            qt = rotate(q[t], cos[-1], sin[-1])  # the query is the last of its own visible set
            weights = torch.softmax(torch.einsum("hd,jhd->hj", qt, keys) * a.head_dim ** -0.5, -1)
            out[t] = torch.einsum("hj,jhd->hd", weights, v[js].repeat_interleave(groups, 1))
        h = h + a.o_proj(out.reshape(n, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        keep = [j for j in range(n) if kind[j] != "raw"]
        kept_k.append(k[keep]), kept_v.append(v[keep])
    logits = model.lm_head(lm.norm(h))
    last_raw = max(j for j in range(n) if kind[j] == "raw")
    rows = [j for j in range(n) if kind[j] == "sink"] + [last_raw] + [j for j in range(n) if kind[j] == "text"]
    return logits[rows], kept_k, kept_v


# ------------------------------------------------------------------------------------------------------ tests


def test_text_only_equals_hf_qwen2(model):
    hf = Qwen2ForCausalLM(model.config).double().eval()
    hf.load_state_dict({k: v for k, v in model.state_dict().items() if k in hf.state_dict()}, strict=True)
    ids = torch.randint(4, VOCAB, (2, 13))  # no pad id: HF would mask it
    with torch.no_grad():
        ours = model(ids).logits
        ref = hf(ids).logits
        assert (ours - ref).abs().max() <= 1e-10
        # Text-only prompts through generate, batched: greedy continuation equals HF's.
        ours_gen = model.generate(ids, max_new_tokens=4, eos_token_id=-1)
        ref_gen = hf.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours_gen, ref_gen[:, ids.shape[1]:])


@pytest.mark.parametrize("frames,ratios,prefix,suffix", [
    (30, [4, 4, 4], 5, 6),  # 3 windows (48, 48, 24 tokens)
    (13, [16, 2], 0, 3),  # no sink; a 4-token last window
    (7, [8], 3, 0),  # one short window, nothing after the video (its last raw token gives the next logits)
])
def test_eviction_equals_masking(model, frames, ratios, prefix, suffix):
    ids = prompt(prefix, suffix, seed=frames)
    with torch.no_grad():
        feats = model.encode_frames(video(frames, seed=frames))
        ref_logits, ref_k, ref_v = reference_run(model, ids, feats, ratios)
        if len(set(ratios)) == 1:
            got = model.prefill([ids], features=[feats], ratio=ratios[0])
        else:  # draw per window from the configured ratios; the reference follows the draws
            got = model.prefill([ids], features=[feats], generator=torch.Generator().manual_seed(1))
            ratios[:] = got.ratios[0]
            ref_logits, ref_k, ref_v = reference_run(model, ids, feats, ratios)
    assert got.ratios[0] == ratios
    assert (got.logits[0] - ref_logits).abs().max() <= 1e-10
    for layer in range(model.config.num_hidden_layers):
        keys, values = got.memory.sample(0, layer)
        assert keys.shape == ref_k[layer].shape
        assert (keys - ref_k[layer]).abs().max() <= 1e-10
        assert (values - ref_v[layer]).abs().max() <= 1e-10


def test_decoding_equals_teacher_forcing(model):
    ids = prompt(4, 5, seed=3)
    frames = video(17, seed=3)
    with torch.no_grad():
        result = model.prefill([ids], [frames], ratio=8)
        steps = list(model.stream_tokens(result, max_new_tokens=6, eos_token_id=-1))
        answer = torch.stack([tokens[0] for tokens, _, _ in steps])
        forced = model.prefill([torch.cat([ids, answer])], [frames], ratio=8).logits[0]
    decoded_scores = torch.stack([scores[0] for _, scores, _ in steps])
    # decoded step i predicts answer[i]: in one chunk that is the row before answer[i]
    assert (decoded_scores - forced[len(ids) - 1:-1]).abs().max() <= 1e-10
    assert torch.equal(answer, forced[len(ids) - 1:-1].argmax(-1))


@pytest.mark.parametrize("frames,ratio", [(12, 4), (13, 4), (24, 16), (6, 8), (14, 8), (25, 2)])
def test_kv_accounting(model, frames, ratio):
    prefix, suffix = 3, 4
    ids = prompt(prefix, suffix)
    feats = torch.randn(frames * TOKENS, 32, dtype=torch.float64)
    with torch.no_grad():
        got = model.prefill([ids], features=[feats], ratio=ratio)
    mem = got.memory
    assert (mem.sink, mem.vst, mem.text) == ([prefix], [frames * TOKENS // ratio], [suffix])
    for keys, values in zip(mem.keys, mem.values):
        assert keys.shape == values.shape == (prefix + frames * TOKENS // ratio + suffix, 2, 8)
    assert mem.nbytes() == 2 * 2 * (prefix + frames * TOKENS // ratio + suffix) * 2 * 8 * 8


def test_kv_accounting_random_ratios(model):
    feats = torch.randn(40 * TOKENS, 32, dtype=torch.float64)
    with torch.no_grad():
        got = model.prefill([prompt(2, 2)], features=[feats], generator=torch.Generator().manual_seed(7))
    windows = [WINDOW] * 3 + [16]
    assert len(got.ratios[0]) == 4 and all(w % r == 0 for w, r in zip(windows, got.ratios[0]))
    assert got.memory.vst == [sum(w // r for w, r in zip(windows, got.ratios[0]))]
    again = model.prefill([prompt(2, 2)], features=[feats], generator=torch.Generator().manual_seed(7))
    assert again.ratios == got.ratios


def test_interleave_layout():
    is_vst, rem = interleave_layout(12, 4)
    assert is_vst.tolist() == ([False] * 4 + [True]) * 3 and rem == 0
    is_vst, rem = interleave_layout(10, 4)
    assert is_vst.nonzero().flatten().tolist() == [4, 9] and rem == 2
    # A window fed in parts: the remainder carries over, so the parts concatenate to the whole.
    for r in (2, 3, 4, 8):
        for split in (1, 3, 5, 7, 11):
            first, rem = interleave_layout(split, r)
            second, rem2 = interleave_layout(23 - split, r, rem)
            whole, rem_whole = interleave_layout(23, r)
            assert torch.equal(torch.cat([first, second]), whole) and rem2 == rem_whole
            assert int(whole.sum()) == 23 // r


@pytest.mark.parametrize("select_layer", [-2, -1, 0, 1])
def test_tower_stops_at_the_select_layer(select_layer):
    """The tower runs only the layers up to the select layer; its output is HF's hidden state of that layer."""
    _, vision = tiny_configs()
    torch.manual_seed(1)
    tower = randomize(CLIPTower(vision, select_layer).double())
    pixels = video(3, seed=7)
    states = tower.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(tower(pixels), states[select_layer][:, 1:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="mm_vision_select_layer"):
        CLIPTower(vision, len(states))


def test_batch_equals_alone_and_no_leaks(model):
    prompts = [prompt(3, 5, seed=1), prompt(6, 2, seed=2), torch.randint(4, VOCAB, (7,)), prompt(0, 4, seed=4)]
    videos = [video(30, seed=1), video(5, seed=2), None, video(13, seed=4)]
    with torch.no_grad():
        batch = model.prefill(prompts, videos, ratio=4)
        for b in range(len(prompts)):
            alone = model.prefill([prompts[b]], [videos[b]], ratio=4)
            assert (batch.logits[b] - alone.logits[0]).abs().max() <= 1e-10
            for layer in range(2):
                assert torch.allclose(batch.memory.sample(b, layer)[0], alone.memory.sample(0, layer)[0],
                                      atol=1e-10, rtol=0)
        # generate in the official convention, padded batch: equals each prompt alone
        width = max(len(p) for p in prompts[:2])
        ids = torch.zeros(2, width, dtype=torch.long)
        mask = torch.zeros(2, width, dtype=torch.long)
        for b in range(2):
            ids[b, width - len(prompts[b]):] = prompts[b]
            mask[b, width - len(prompts[b]):] = 1
        together = model.generate(ids, images=videos[:2], modalities=["video"] * 2, attention_mask=mask,
                                  max_new_tokens=5, eos_token_id=-1, ratio=4)
        for b in range(2):
            alone = model.generate(prompts[b][None], images=[videos[b]], modalities=["video"], max_new_tokens=5,
                                   eos_token_id=-1, ratio=4)
            assert torch.equal(together[b], alone[0])
        # a sample that stops early (its first token is eos) is padded while the other continues unchanged
        stop = int(together[0, 0])
        early = model.generate(ids, images=videos[:2], attention_mask=mask, max_new_tokens=5, eos_token_id=stop,
                               pad_token_id=-1, ratio=4)
        assert early[0].tolist() == [stop] + [-1] * 4
        cut = (together[1] == stop).nonzero().flatten().tolist()
        end = cut[0] + 1 if cut else 5
        assert torch.equal(early[1, :end], together[1, :end])
        # the official skip arguments, when given right, change nothing
        where = int((prompts[0] == IMAGE_TOKEN_INDEX).nonzero())
        skipped = model.generate(prompts[0][None], images=[videos[0]], max_new_tokens=3, eos_token_id=-1, ratio=4,
                                 beacon_skip_first=where, beacon_skip_last=where + 30 * TOKENS)
        assert torch.equal(skipped[0], together[0, :3])
        # a second call after a first equals a fresh model's answer
        fresh = copy.deepcopy(model)
        first = model.generate(prompts[0][None], images=[videos[0]], max_new_tokens=5, eos_token_id=-1)
        second = model.generate(prompts[1][None], images=[videos[1]], max_new_tokens=5, eos_token_id=-1)
        assert torch.equal(second, fresh.generate(prompts[1][None], images=[videos[1]], max_new_tokens=5,
                                                  eos_token_id=-1))
        assert torch.equal(first, fresh.generate(prompts[0][None], images=[videos[0]], max_new_tokens=5,
                                                 eos_token_id=-1))


def test_gradients_through_vsts(model):
    model = copy.deepcopy(model).train()
    ids = prompt(3, 6, seed=5)
    labels = ids.clone()
    labels[:5] = -100  # only the answer part of the text after the video is labelled
    feats = model.encode_frames(video(26, seed=5))
    feats.retain_grad()
    result = model.prefill([ids], features=[feats], ratio=4)
    logits = result.logits[0]
    loss = F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100)
    loss.backward()
    layers = model.model.layers
    for layer in layers:
        for p in ("k", "v"):
            assert getattr(layer.self_attn, f"beacon_{p}_proj").weight.grad.abs().sum() > 0
    for layer in layers[:-1]:
        assert layer.self_attn.beacon_q_proj.weight.grad.abs().sum() > 0
    # a VST's last-layer output is read by no one (only its keys and values are), so the last beacon_q_proj
    # gets no gradient, as in the official code
    assert layers[-1].self_attn.beacon_q_proj.weight.grad.abs().sum() == 0
    assert model.model.beacon_embed_tokens.weight.grad.abs().sum() > 0
    assert model.model.mm_projector[0].weight.grad.abs().sum() > 0
    assert model.model.vision_tower.vision_tower.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    # the text only sees VSTs, so the first window's features reach the loss only through them
    assert feats.grad[:WINDOW].abs().sum() > 0
    # forward(labels): the placeholder carries no label; the loss is the mean over the labelled text
    model.zero_grad()
    out = model(ids[None], images=[video(26, seed=5)], labels=labels[None], ratio=4)
    assert torch.allclose(out.loss, loss.detach(), atol=1e-10, rtol=0)
    labels_on_placeholder = labels.clone()
    labels_on_placeholder[3] = 7
    assert torch.allclose(model(ids[None], images=[video(26, seed=5)], labels=labels_on_placeholder[None],
                                ratio=4).loss, loss.detach(), atol=1e-10, rtol=0)


def official_state(model):
    """Our state dict under the official names (transformers 4.x ``vision_model.`` level in the tower)."""
    prefix = "model.vision_tower.vision_tower."
    return {(prefix + "vision_model." + k[len(prefix):] if k.startswith(prefix) else k): v.detach().clone()
            for k, v in model.state_dict().items()}


def write_folder(path, model, state, tower="clip-tower"):
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    half = len(names) // 2
    index = {}
    for shard, part in enumerate((names[:half], names[half:])):
        file = f"model-{shard + 1:05d}-of-00002.safetensors"
        save_file({k: state[k].contiguous() for k in part}, str(path / file))
        index.update({k: file for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    fields = model.config.to_dict()
    fields.update(architectures=["LlavaQwenForCausalLM"], model_type="llava_qwen", mm_vision_tower=tower)
    (path / "config.json").write_text(json.dumps(fields))
    if tower is not None and not tower.startswith("/missing"):
        model.vision_config.save_pretrained(str(path / tower))
    return path


def test_official_checkpoint_folder(model, tmp_path):
    state = official_state(model)
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in state
    folder = write_folder(tmp_path / "ckpt", model, {
        **state, "model.layers.0.self_attn.beacon_o_proj.weight": torch.zeros(32, 32, dtype=torch.float64)})
    with pytest.warns(UserWarning, match="beacon_o_proj"):
        loaded = VideoXL.from_pretrained(folder)
    ids = prompt(3, 4, seed=9)
    with torch.no_grad():
        want = model.prefill([ids], [video(15)], ratio=4).logits[0]
        # equal up to summation order (tensors read from safetensors sit at other alignments: other SIMD paths)
        assert (loaded.prefill([ids], [video(15)], ratio=4).logits[0] - want).abs().max() <= 1e-12
        with pytest.warns(UserWarning, match="beacon_o_proj"):
            built = create_model("videoxl_qwen2_7b", pretrained=str(folder))
        assert built.config.hidden_size == 32 and built.vision_config.hidden_size == 24
        assert (built.prefill([ids], [video(15)], ratio=4).logits[0] - want).abs().max() <= 1e-12
    # a missing and a misnamed tensor are clear errors naming them
    broken = dict(state)
    del broken["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        VideoXL.from_pretrained(write_folder(tmp_path / "missing", model, broken))
    renamed = dict(state)
    renamed["model.mm_projector.1.weight"] = renamed.pop("model.mm_projector.2.weight")
    with pytest.raises(KeyError, match="mm_projector.1.weight"):
        VideoXL.from_pretrained(write_folder(tmp_path / "renamed", model, renamed))
    # beacon projections absent: initialized from q/k/v as the official loader does, and said so
    no_beacon = {k: v for k, v in state.items() if ".beacon_" not in k and "beacon_embed" not in k}
    with pytest.warns(UserWarning, match="lacks"):
        plain = VideoXL.from_pretrained(write_folder(tmp_path / "plain", model, no_beacon))
    attn = plain.model.layers[1].self_attn
    assert torch.equal(attn.beacon_k_proj.weight, attn.k_proj.weight)
    assert torch.equal(plain.model.beacon_embed_tokens.weight[0], plain.model.embed_tokens.weight[3])


def test_tower_folder_resolution(model, tmp_path):
    state = official_state(model)
    folder = write_folder(tmp_path / "abs", model, state, tower=str(tmp_path / "abs" / "tower"))
    assert VideoXL.from_pretrained(folder).vision_config.hidden_size == 24
    # the released config names a path on its authors' machine: ViT-L/14-336's shape, with a warning
    folder = write_folder(tmp_path / "gone", model, state, tower="/missing/clip-vit-large-patch14-336")
    with pytest.warns(UserWarning, match="not found"), pytest.raises(ValueError, match="tower width \\(1024\\)"):
        VideoXL.from_pretrained(folder)  # the tiny config's projector does not fit ViT-L, which says so


def test_official_names_on_meta_device():
    with torch.device("meta"):
        big = create_model("videoxl_qwen2_7b")
    shapes = {k: tuple(v.shape) for k, v in big.state_dict().items()}
    assert shapes["model.layers.27.self_attn.beacon_q_proj.weight"] == (3584, 3584)
    assert shapes["model.layers.27.self_attn.beacon_k_proj.bias"] == (512,)
    assert shapes["model.beacon_embed_tokens.weight"] == (1, 3584)
    assert shapes["model.mm_projector.0.weight"] == (3584, 1024)
    assert shapes["model.mm_projector.2.weight"] == (3584, 3584)
    assert shapes["lm_head.weight"] == (152064, 3584)
    assert shapes["model.vision_tower.vision_tower.embeddings.position_embedding.weight"] == (577, 1024)
    assert big.tokens_per_frame == 144
    renamed = official_to_ours({"model.vision_tower.vision_tower.vision_model.post_layernorm.weight": 1})
    assert list(renamed) == ["model.vision_tower.vision_tower.post_layernorm.weight"]


def test_bad_input(model):
    ids = prompt(2, 2)
    with pytest.raises(ValueError, match="no frames"):
        model.prefill([ids], [video(0)])
    with pytest.raises(ValueError, match="placeholder"):
        model.prefill([torch.randint(4, VOCAB, (6,))], [video(3)])
    with pytest.raises(ValueError, match="exactly once"):
        model.prefill([torch.cat([ids, ids])], [video(3)])
    with pytest.raises(ValueError, match=r"\[F, 3, 56, 56\]"):
        model.prefill([ids], [torch.randn(3, 3, 64, 64, dtype=torch.float64)])
    with pytest.raises(ValueError, match="dividing beacon_window"):
        model.prefill([ids], [video(3)], ratio=5)
    with pytest.raises(ValueError, match="beacon_skip_last"):
        model.generate(ids[None], images=[video(3)], beacon_skip_first=2, beacon_skip_last=5)
    with pytest.raises(ValueError, match="one video per prompt"):
        model.generate(torch.stack([ids, ids]), images=[video(3)])
    with pytest.raises(ValueError, match="beacon_ratio"):
        VideoXL(*tiny_configs(beacon_ratio=[7]))


# ------------------------------------------------------------------------------------------- chat, frames, CLI


def tiny_tokenizer(path):
    """A word-level tokenizer with ChatML's specials and exactly VOCAB entries (<|im_end|> = eos = 3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<|im_start|>", "<|endoftext|>", "<|im_end|>", "system", "user", "assistant", "You", "are",
             "a", "helpful", ".", "What", "happens", "?", "the", "ball", "bikes"]
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(str(path))
    return fast


@pytest.fixture(scope="module")
def folder(model, tmp_path_factory):
    path = write_folder(tmp_path_factory.mktemp("videoxl") / "ckpt", model, official_state(model))
    tiny_tokenizer(path)
    return path


def test_chat_template_and_streaming(model, folder):
    loaded = VideoXL.from_pretrained(folder)
    tok = loaded.tokenizer
    ids = chat_input_ids(tok, "What happens ?")
    assert int((ids == IMAGE_TOKEN_INDEX).sum()) == 1
    text = tok.decode(ids[ids >= 0].tolist())
    assert text.startswith("<|im_start|> system You are a helpful assistant . <|im_end|>")
    assert tok.decode(ids[int((ids == IMAGE_TOKEN_INDEX).nonzero()) + 1:].tolist()) == \
        "What happens ? <|im_end|> <|im_start|> assistant"
    frames = video(9, seed=11)
    with torch.no_grad():
        answer = loaded.chat(video=frames, prompt="What happens ?", max_new_tokens=6, ratio=4)
        generated = loaded.generate(ids[None], images=[frames], modalities=["video"], max_new_tokens=6,
                                    eos_token_id=3, ratio=4, pad_token_id=3)
    want = tok.decode([t for t in generated[0].tolist() if t != 3], skip_special_tokens=True)
    assert answer == want
    pieces = list(loaded.chat(video=frames, prompt="What happens ?", max_new_tokens=6, ratio=4, stream=True))
    assert "".join(pieces) == answer
    sampled = loaded.chat(video=frames, prompt="What happens ?", max_new_tokens=6, ratio=4, do_sample=True,
                          temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(0))
    assert isinstance(sampled, str)
    class Collect:  # HF's streamer protocol
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, value):
            self.tokens += value.reshape(-1).tolist()

        def end(self):
            self.ended = True

    streamer = Collect()
    out = loaded.generate(ids[None], images=[frames], max_new_tokens=3, eos_token_id=-1, output_scores=True,
                          return_dict_in_generate=True, ratio=4, streamer=streamer)
    assert out.sequences.shape == (1, 3) and len(out.scores) == 3 and out.scores[0].shape == (1, VOCAB)
    assert streamer.tokens == out.sequences[0].tolist() and streamer.ended


def test_load_video_as_clip_expects(sample_clips):
    from pyvidfast.io import VideoReader

    path = sample_clips["bikes.mp4"]  # 640x272
    frames = load_video(path, size=56, frames=5)
    assert frames.shape == (5, 3, 56, 56) and frames.dtype == torch.float32
    with VideoReader(path) as reader:
        first = reader[0].permute(2, 0, 1)[None].float() / 255  # native RGB, an independent resize and crop
    resized = F.interpolate(first, size=(56, round(640 * 56 / 272)), mode="bilinear", antialias=True)
    left = (resized.shape[-1] - 56) // 2
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    want = (resized[0, :, :, left:left + 56] - mean) / std
    assert (frames[0] - want).abs().mean() < 0.03
    one_fps = load_video(path, size=56, max_frames=4)
    assert one_fps.shape[0] == 4


def test_cli(folder, sample_clips, capsys):
    from pyvidfast.videoxl.__main__ import main

    assert main(["--checkpoint", str(folder), "--video", str(sample_clips["balle-jbart.mp4"]), "--prompt",
                 "What happens ?", "--frames", "14", "--ratio", "8", "--max-new-tokens", "4",
                 "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert "frames used: 14 (56 visual tokens, 2 windows)" in out
    assert "KV kept:" in out and "VST 7 " in out and "time per stage: load" in out


def test_anyres_image(model):
    from pyvidfast.models.videoxl import anyres_tiles, best_resolution, parse_grid_pinpoints

    assert parse_grid_pinpoints("(1x1),(1x2),(2x1),(2x2)", 56) == [(56, 56), (56, 112), (112, 56), (112, 112)]
    assert parse_grid_pinpoints("[(56, 112), (112, 56)]") == [(56, 112), (112, 56)]
    pinpoints = [(56, 112), (112, 56), (112, 112)]
    # 150 x 100 (w x h): 112x112 keeps 112x74 pixels, more than 84x56 in 112x56 or 56x37 in 56x112
    assert best_resolution(150, 100, pinpoints) == (112, 112)
    assert best_resolution(150, 50, pinpoints) == (112, 56)  # both keep 112x37: the least padding wins
    image = torch.randint(0, 256, (100, 150, 3), dtype=torch.uint8)
    views = anyres_tiles(image, pinpoints, size=56)
    assert views.shape == (5, 3, 56, 56)
    black = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD))[:, None]
    # 100 rows scaled to ceil(100 * 112 / 150) = 75, centred in 112: 18 black rows on top, 19 below
    assert torch.allclose(views[1, :, :18].reshape(3, -1), black.expand(3, 18 * 56))
    assert not torch.allclose(views[1, :, 18].reshape(3, -1), black.expand(3, 56))
    assert torch.allclose(views[3, :, -19:].reshape(3, -1), black.expand(3, 19 * 56))
    resized = F.interpolate(image.permute(2, 0, 1)[None].float() / 255, size=(75, 112), mode="bicubic",
                            antialias=True).clamp(0, 1)[0]
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    # views[3] = tile (row 1, column 0): canvas rows 56..111, columns 0..55; rows 56..92 hold resized rows 38..74
    assert torch.allclose(views[3, :, :37], (resized[:, 38:75, :56] - mean) / std, atol=1e-6)
    assert torch.allclose(views[2, :, 18:56], (resized[:, :38, 56:] - mean) / std, atol=1e-6)  # (0, 1)
    # the model skips the base view and reads the tiles like frames
    ids = prompt(2, 3)
    with torch.no_grad():
        as_image = model(ids[None], images=[views.double()], modalities=["image"], ratio=4).logits
        as_tiles = model(ids[None], images=[views[1:].double()], modalities=["video"], ratio=4).logits
    assert torch.equal(as_image, as_tiles)
    with pytest.raises(ValueError, match="1 \\+ n"):
        model(ids[None], images=[views[:1].double()], modalities=["image"])
