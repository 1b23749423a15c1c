"""Embedding stage: text encoders, image backbones and the on-disk feature cache.

>>> from llmvem.embed import load_text_encoder, load_backbone, FeatureCache, extract_features  # doctest: +SKIP
"""


from llmvem.embed.base import ImageBackbone, TextEmbeddings, TextEncoder, pool_caption_sets
from llmvem.embed.cache import FeatureCache, FeatureResult, compute_features, extract_features
from llmvem.embed.efficientnet import EfficientNetLite0Backbone, load_efficientnet_lite0_model
from llmvem.embed.image import HFVisionBackbone, TimmBackbone, load_backbone
from llmvem.embed.spatial import LayerSpec, parse_layer_spec
from llmvem.embed.text import CLIPTextEncoder, SentenceTransformerEncoder, load_text_encoder, split_sentences

__all__ = [
    "CLIPTextEncoder",
    "EfficientNetLite0Backbone",
    "FeatureCache",
    "FeatureResult",
    "HFVisionBackbone",
    "ImageBackbone",
    "LayerSpec",
    "SentenceTransformerEncoder",
    "TextEmbeddings",
    "TextEncoder",
    "TimmBackbone",
    "compute_features",
    "extract_features",
    "load_backbone",
    "load_efficientnet_lite0_model",
    "load_text_encoder",
    "parse_layer_spec",
    "pool_caption_sets",
    "split_sentences",
]
