"""Text encoders: a tiny CLIP text model built offline, the bundled MiniLM, long-caption policies, names."""

from __future__ import annotations

import csv
from collections import defaultdict

import numpy as np
import pytest
import torch
from conftest import needs_shared

from llmvem.embed.base import pool_caption_sets
from llmvem.embed.text import (
    CLIPTextEncoder,
    SentenceTransformerEncoder,
    load_text_encoder,
    split_sentences,
)
from llmvem.errors import ConfigError, LLMVEMError, ModelLoadError

# A 300-word caption made of 20 sentences of 15 words (the style of a verbose VLM description).
_SENTENCE = "The small brown dog runs across the green park while children laugh and play nearby."
LONG_CAPTION = " ".join([_SENTENCE] * 20)
assert len(LONG_CAPTION.split()) == 300


def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocabulary: every byte symbol alone and word-final, plus a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab[s] = len(vocab)
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("o", "g</w>"), ("d", "og</w>"), ("a", "t</w>"), ("c", "at</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return vocab, merges


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A randomly initialised 2-layer CLIP text model + CLIP tokenizer saved like a user's model folder."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    vocab, merges = _clip_vocab()
    path = tmp_path_factory.mktemp("tiny_clip")
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(path)
    config = CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=16, bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(0)
    CLIPTextModelWithProjection(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def clip(tiny_clip_dir) -> CLIPTextEncoder:
    enc = load_text_encoder(f"clip:{tiny_clip_dir}", device="cpu")
    assert isinstance(enc, CLIPTextEncoder)
    return enc


@pytest.fixture(scope="module")
def minilm() -> SentenceTransformerEncoder:
    enc = load_text_encoder("minilm", device="cpu")
    assert isinstance(enc, SentenceTransformerEncoder)
    return enc


def _native_clip(enc: CLIPTextEncoder, texts: list[str], **tok_kwargs) -> np.ndarray:
    with torch.no_grad():
        batch = enc.tokenizer(texts, padding=True, return_tensors="pt", **tok_kwargs)
        emb = enc.model(**batch).text_embeds
    return torch.nn.functional.normalize(emb, dim=-1).numpy()


# ------------------------------------------------------------------------------------------------------ CLIP
def test_clip_loads_user_folder_and_matches_transformers(clip, tiny_clip_dir):
    texts = ["the dog", "a cat sat on the mat", "the dog and the cat"]
    out = clip.encode(texts)
    assert clip.max_tokens == 77 and clip.dim == 16 and clip.model_id == f"clip:{tiny_clip_dir}"
    assert out.embeddings.shape == (3, 16) and out.embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out.embeddings, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(out.embeddings, _native_clip(clip, texts), atol=1e-5)
    expected_tokens = [len(ids) for ids in clip.tokenizer(texts)["input_ids"]]
    assert out.n_tokens.tolist() == expected_tokens
    assert not out.long.any() and not out.truncated.any()


def test_clip_truncate_keeps_eos_and_pools_there(tiny_clip_dir):
    enc = CLIPTextEncoder(str(tiny_clip_dir), device="cpu", long_policy="truncate")
    full = enc.tokenizer(LONG_CAPTION)["input_ids"]
    pieces, n_tokens, long, truncated = enc.plan([LONG_CAPTION])
    (seq,) = pieces[0]
    # The truncated sequence is BOS + the first 75 text tokens + EOS: exactly the 77-token context.
    assert len(seq) == 77 and n_tokens[0] == len(full) > 77
    assert seq[0] == enc.tokenizer.bos_token_id and seq[-1] == enc.tokenizer.eos_token_id
    assert seq[1:-1] == full[1:76]
    assert long[0] and truncated[0]
    out = enc.encode([LONG_CAPTION])
    assert out.long[0] and out.truncated[0] and out.n_tokens[0] == len(full)
    # The embedding is the projection of the final hidden state at position 76, the EOS of the truncated text.
    with torch.no_grad():
        hidden = enc.model.text_model(input_ids=torch.tensor([seq])).last_hidden_state
        at_eos = torch.nn.functional.normalize(enc.model.text_projection(hidden[:, 76]), dim=-1).numpy()
        at_75 = torch.nn.functional.normalize(enc.model.text_projection(hidden[:, 75]), dim=-1).numpy()
    np.testing.assert_allclose(out.embeddings, at_eos, atol=1e-5)
    assert float(out.embeddings[0] @ at_75[0]) < 0.999
    # ... and equal to transformers' own truncation, which also keeps the EOS.
    np.testing.assert_allclose(out.embeddings, _native_clip(enc, [LONG_CAPTION], truncation=True, max_length=77),
                               atol=1e-5)


def test_clip_sentence_mean_averages_sentences_and_windows_long_sentences(clip):
    out = clip.encode([LONG_CAPTION, "the dog"])
    assert out.long.tolist() == [True, False] and not out.truncated.any()
    sentences = split_sentences(LONG_CAPTION)
    assert len(sentences) == 20
    per_sentence = clip.encode(sentences).embeddings
    expected = per_sentence.mean(axis=0)
    expected /= np.linalg.norm(expected)
    np.testing.assert_allclose(out.embeddings[0], expected, atol=1e-5)
    # A single 300-word sentence (no punctuation) is cut into consecutive windows of 75 text tokens.
    run_on = LONG_CAPTION.replace(".", "")
    pieces, n_tokens, long, truncated = clip.plan([run_on])
    n_text = int(n_tokens[0]) - 2
    assert long[0] and not truncated[0]
    assert len(pieces[0]) == -(-n_text // 75)
    assert all(len(p) <= 77 and p[-1] == clip.tokenizer.eos_token_id for p in pieces[0])
    assert sum(len(p) - 2 for p in pieces[0]) == n_text  # every token embedded once


def test_clip_policies_differ_only_for_long_captions(tiny_clip_dir, clip):
    trunc = CLIPTextEncoder(str(tiny_clip_dir), device="cpu", long_policy="truncate")
    texts = ["a cat sat on the mat", LONG_CAPTION]
    a, b = clip.encode(texts).embeddings, trunc.encode(texts).embeddings
    np.testing.assert_allclose(a[0], b[0], atol=1e-6)
    assert float(a[1] @ b[1]) < 0.999


def test_clip_text_tower_of_a_full_clip_checkpoint(tmp_path, capfd):
    """A user's CLIP folder usually holds both towers (CLIPModel): the text tower and its projection load."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab, merges = _clip_vocab()
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(tmp_path)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8), projection_dim=24)
    torch.manual_seed(0)
    full = CLIPModel(config).eval()
    full.save_pretrained(tmp_path)
    capfd.readouterr()
    enc = load_text_encoder(f"clip:{tmp_path}", device="cpu")
    assert enc.dim == 24
    texts = ["the dog", "a cat sat on the mat"]
    with torch.no_grad():
        ref = full.get_text_features(**enc.tokenizer(texts, padding=True, return_tensors="pt"))
    ref = getattr(ref, "pooler_output", ref)
    np.testing.assert_allclose(enc.encode(texts).embeddings, torch.nn.functional.normalize(ref, dim=-1).numpy(),
                               atol=1e-5)
    assert "UNEXPECTED" not in capfd.readouterr().err  # the unused vision tower is not reported


def test_clip_bad_folder_names_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(ModelLoadError, match="no_such_model"):
        load_text_encoder(f"clip:{missing}", device="cpu")


# ---------------------------------------------------------------------------------------------------- MiniLM
def test_minilm_matches_sentence_transformers_on_short_text(minilm):
    texts = ["A dog runs on the beach.", "Two people ride bicycles down a city street."]
    out = minilm.encode(texts)
    assert out.embeddings.shape == (2, 384) and minilm.max_tokens == 256
    assert out.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    native = minilm.model.encode(texts, normalize_embeddings=True)
    np.testing.assert_allclose(out.embeddings, native, atol=1e-5)


def test_minilm_related_captions_are_closer(minilm):
    emb = minilm.encode([
        "A dog runs across the beach.",
        "A puppy is running along the sand by the sea.",
        "A man plays an electric guitar on stage.",
        "A musician performs a song with his guitar at a concert.",
    ]).embeddings
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3 and sim[0, 1] > sim[0, 3] + 0.3
    assert sim[2, 3] > sim[2, 0] + 0.3 and sim[2, 3] > sim[2, 1] + 0.3


@pytest.mark.shared_data
def test_minilm_same_image_flickr_captions_are_closer(minilm):
    path = needs_shared("flickr8k_1000", "captions.csv")
    caps: dict[str, list[str]] = defaultdict(list)
    with open(path, encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            caps[row["image"]].append(row["caption"])
    names = sorted(caps)[:100]
    sets = [caps[n][:5] for n in names]
    emb = minilm.encode([c for s in sets for c in s]).embeddings
    owner = np.repeat(np.arange(len(sets)), 5)
    sim = emb @ emb.T
    same = (owner[:, None] == owner[None, :]) & ~np.eye(len(owner), dtype=bool)
    diff = owner[:, None] != owner[None, :]
    within, across = sim[same].mean(), sim[diff].mean()
    # Measured on these 100 images: within 0.61, across 0.09; all 500 captions closer to their own image.
    assert within > 0.45 and across < 0.2 and within - across > 0.35
    # Per image, its own captions are closer to each other than to other images' captions for nearly all images.
    per_image = [(sim[i][same[i]].mean() > sim[i][diff[i]].mean()) for i in range(len(owner))]
    assert np.mean(per_image) > 0.95


def test_minilm_long_caption_policies(minilm):
    assert minilm.max_tokens == 256
    out = minilm.encode([LONG_CAPTION])
    assert out.long[0] and not out.truncated[0] and out.n_tokens[0] > 256
    sentences = split_sentences(LONG_CAPTION)
    expected = minilm.model.encode(sentences, normalize_embeddings=True).mean(axis=0)
    np.testing.assert_allclose(out.embeddings[0], expected / np.linalg.norm(expected), atol=1e-5)

    trunc = SentenceTransformerEncoder(None, device="cpu", long_policy="truncate")
    t_out = trunc.encode([LONG_CAPTION])
    assert t_out.long[0] and t_out.truncated[0] and t_out.n_tokens[0] == out.n_tokens[0]
    # sentence-transformers itself silently keeps the first 256 tokens ([CLS] + 254 + [SEP]): same vector,
    # but llmvem flags it.
    native = minilm.model.encode([LONG_CAPTION], normalize_embeddings=True)
    np.testing.assert_allclose(t_out.embeddings, native, atol=1e-5)
    (seq,) = trunc.plan([LONG_CAPTION])[0][0]
    assert len(seq) == 256 and seq[0] == trunc.tokenizer.cls_token_id and seq[-1] == trunc.tokenizer.sep_token_id


def test_caption_sets_are_renormalised_means(minilm):
    sets = [["A dog runs.", "A puppy plays in the grass."], ["A red car."]]
    out = minilm.encode_caption_sets(sets)
    flat = minilm.encode([c for s in sets for c in s]).embeddings
    first = flat[:2].mean(axis=0)
    np.testing.assert_allclose(out[0], first / np.linalg.norm(first), atol=1e-6)
    np.testing.assert_allclose(out[1], flat[2], atol=1e-6)
    np.testing.assert_allclose(pool_caption_sets(flat, [2, 1]), out, atol=1e-7)
    with pytest.raises(ValueError, match="at least one caption"):
        minilm.encode_caption_sets([["x"], []])


# ------------------------------------------------------------------------------------------- names, helpers
def test_text_encoder_names_and_policies_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="unknown name 'bert'"):
        load_text_encoder("bert")
    with pytest.raises(ConfigError, match="long_policy"):
        load_text_encoder("minilm", long_policy="drop")  # type: ignore[arg-type]
    with pytest.raises(LLMVEMError, match="not_here"):
        load_text_encoder(f"st:{tmp_path / 'not_here'}", device="cpu")


def test_split_sentences():
    assert split_sentences("A dog. A cat!  Is it? Yes;\nnew line") == ["A dog.", "A cat!", "Is it?", "Yes;",
                                                                       "new line"]
    assert split_sentences("3.5 metres tall") == ["3.5 metres tall"]
    assert split_sentences("   ") == []


# ------------------------------------------------------------------------------------------------------- CLI
def test_cli_embed_text_from_dataset_captions_and_from_a_caption_store(tmp_path, capsys):
    from llmvem.cli import main

    spec = "virtual:n_train=6,n_test=3,image_size=48,n_early=10,n_semantic=10"
    direct = tmp_path / "direct.npz"
    assert main(["embed", spec, "--text", "--text-out", str(direct), "--device", "cpu"]) == 0
    assert "captions from: dataset" in capsys.readouterr().out
    data = np.load(direct)
    assert data["embeddings"].shape == (9, 384) and data["image_ids"].shape == (9,)
    np.testing.assert_allclose(np.linalg.norm(data["embeddings"], axis=1), 1.0, atol=1e-5)
    assert list(data["splits"]).count("test") == 3 and str(data["model_id"]).endswith("all-MiniLM-L6-v2")
    assert data["caption_long"].dtype == bool and (data["n_captions"] >= 1).all()
    assert len(data["caption_n_tokens"]) == data["n_captions"].sum()

    # The same captions written to a caption store by `llmvem caption --backend dataset` give the same vectors.
    store = tmp_path / "captions.sqlite"
    assert main(["caption", spec, "--store", str(store), "--backend", "dataset"]) == 0
    via_store = tmp_path / "store.npz"
    assert main(["embed", spec, "--text", "--captions", str(store), "--text-out", str(via_store),
                 "--device", "cpu"]) == 0
    assert f"captions from: {store}" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(via_store)["embeddings"], data["embeddings"], atol=1e-6)
    np.testing.assert_array_equal(np.load(via_store)["content_hashes"], data["content_hashes"])

    empty = tmp_path / "empty.sqlite"
    from llmvem.captions import CaptionStore

    CaptionStore(empty).close()
    assert main(["embed", spec, "--text", "--captions", str(empty), "--text-out", str(tmp_path / "x.npz")]) == 2
    assert "empty.sqlite" in capsys.readouterr().err
