"""The transformers VLM captioner, through the real LLaVA classes, on a tiny random model saved to disk.

The model, tokenizer and processor are built here from configs (nothing downloads), saved with
``save_pretrained`` and loaded back through the same path a user takes (``AutoProcessor`` +
``AutoModelForImageTextToText`` from a local directory). The captions are gibberish words of the tiny vocabulary.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from llmvem.errors import ModelLoadError

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "USER", "ASSISTANT", ":"] + [f"w{i}" for i in range(56)]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory):
    import importlib

    importlib.import_module("llmvem.embed")  # makes a mismatched torchvision wheel importable (as the captioner does)
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>",
                                        extra_special_tokens={"image_token": "<image>"})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=16,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=32, patch_size=16, projection_dim=16),
        text_config=LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_index=WORDS.index("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    path = tmp_path_factory.mktemp("tiny_llava")
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 4 * i, 50, 3), dtype=np.uint8)) for i in range(n)]


def test_tiny_llava_one_caption_per_image_deterministic(tiny_llava_dir):
    from llmvem.captions import TransformersCaptioner

    cap = TransformersCaptioner(str(tiny_llava_dir), prompt="w1 w2 w3", max_new_tokens=6, device="cpu")
    assert type(cap.model).__name__ == "LlavaForConditionalGeneration"
    assert type(cap.processor).__name__ == "LlavaProcessor"
    assert cap.prompt_text() == "USER: <image> w1 w2 w3 ASSISTANT :"
    images = _images(3)
    results = cap.caption_batch(images, ["a", "b", "c"])
    assert [r.image_id for r in results] == ["a", "b", "c"]
    for r in results:
        assert r.ok and len(r.captions) == 1
        words = r.captions[0].split()
        assert 1 <= len(words) <= 6 and all(w in WORDS for w in words)
        assert r.truncated == (len(words) == 6)
    # greedy decoding: the same again, and the same one image at a time (left padding is right)
    assert cap.caption(images) == [r.captions for r in results]
    assert [cap.caption([img])[0] for img in images] == [r.captions for r in results]
    assert cap.settings() == {"max_new_tokens": 6, "do_sample": False, "temperature": None, "top_p": None,
                              "seed": None, "num_beams": 1, "repetition_penalty": 1.0, "generation_kwargs": {}}
    assert cap.runtime() == {"device": "cpu", "dtype": "float32", "trust_remote_code": False}
    assert cap.identity()["model_id"] == str(tiny_llava_dir) and cap.identity()["prompt"] == "w1 w2 w3"


def test_tiny_llava_into_store_and_settings_change_hash(tiny_llava_dir, tmp_path):
    from llmvem.captions import CaptionStore, TransformersCaptioner, run_captioning
    from llmvem.data.images import ArrayImages

    arr = np.stack([np.asarray(img.resize((32, 32))) for img in _images(5)])
    images = ArrayImages(arr)
    cap = TransformersCaptioner(str(tiny_llava_dir), prompt="w4 w5", max_new_tokens=4, device="cpu")
    with CaptionStore(tmp_path / "v.sqlite") as store:
        s = run_captioning(images, cap, store, batch_size=2, show_progress=False)
        assert (s.done, s.failed) == (5, 0)
        caps = store.get_for(images, cap.config_hash)
        assert all(len(c) == 1 and c[0] for c in caps)
        rec = store.config(cap.config_hash)
        assert rec.prompt == "w4 w5" and rec.settings["max_new_tokens"] == 4 and rec.backend == "transformers"
    cap.max_new_tokens = 5
    assert cap.config_hash != rec.config_hash
    sampled = TransformersCaptioner(str(tiny_llava_dir), prompt="w4 w5", max_new_tokens=4, do_sample=True,
                                    temperature=0.7, seed=1, device="cpu")
    assert sampled.settings()["temperature"] == 0.7 and sampled.settings()["seed"] == 1
    one = sampled.caption(_images(2))
    assert sampled.caption(_images(2)) == one  # seeded sampling repeats


def test_missing_model_dir_is_a_clear_error(tmp_path):
    from llmvem.captions import TransformersCaptioner

    with pytest.raises(ModelLoadError, match=r"no_model: cannot load as an image-text-to-text model"):
        TransformersCaptioner(str(tmp_path / "no_model"), device="cpu")


def test_dtype_keyword_follows_the_transformers_version():
    import torch

    from llmvem.captions.vlm import dtype_kwarg

    assert dtype_kwarg(torch.float16, "4.46.3") == {"torch_dtype": torch.float16}
    assert dtype_kwarg(torch.float16, "4.55.4") == {"torch_dtype": torch.float16}
    assert dtype_kwarg(torch.bfloat16, "4.56.0") == {"dtype": torch.bfloat16}
    assert dtype_kwarg(torch.bfloat16, "5.0.0rc1") == {"dtype": torch.bfloat16}
    assert list(dtype_kwarg(torch.float32)) == ["dtype"]  # the installed transformers is >= 4.56
