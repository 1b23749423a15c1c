"""Caption a whole image collection into a caption store, resumably."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from llmvem.captions.base import Captioner, CaptionResult, describe_failures
from llmvem.captions.store import CaptionStore
from llmvem.data.images import ImageCollection
from llmvem.errors import CaptionError
from llmvem.utils import progress, progress_bar

logger = logging.getLogger(__name__)


@dataclass
class CaptionSummary:
    """What a captioning run did.

    Attributes
    ----------
    n_images : int
        Images in the collection.
    done : int
        Images captioned and stored by this run.
    skipped : int
        Images that already had captions for this configuration (from an earlier run, another worker, or an
        identical image earlier in the collection).
    failed : int
        Images without captions after this run (after retries).
    failed_ids : list of str
    errors : dict of image id to str
        Why each failed image failed.
    truncated : int
        Captions that stopped at the token limit (cut off mid-sentence; raise the limit to avoid).
    config_hash : str
    elapsed_s : float
        Wall time of the captioning (not counting hashing).
    others : int
        Images left to other workers: still claimed by another process on the same store when this one finished.
    """

    n_images: int
    done: int
    skipped: int
    failed: int
    failed_ids: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    truncated: int = 0
    config_hash: str = ""
    elapsed_s: float = 0.0
    others: int = 0

    @property
    def images_per_s(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {"n_images": self.n_images, "done": self.done, "skipped": self.skipped, "failed": self.failed,
                "failed_ids": self.failed_ids, "truncated": self.truncated, "config_hash": self.config_hash,
                "elapsed_s": self.elapsed_s, "images_per_s": self.images_per_s, "others": self.others}


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass

    def close(self) -> None:
        pass


def run_captioning(images: ImageCollection, captioner: Captioner, store: CaptionStore, batch_size: int | None = None,
                   show_progress: bool = True, raise_on_failure: bool = False, claim_size: int | None = None,
                   lease_s: float = 120.0) -> CaptionSummary:
    """Caption every image of ``images`` that ``store`` lacks under ``captioner``'s configuration.

    Images are keyed by content hash, so a rerun (after a crash, Ctrl-C or failures) captions only what is
    missing, and identical images are captioned once. Each batch of results is committed as it arrives.
    Several processes may run this on the same store at once: each claims ``claim_size`` images at a time
    (:meth:`CaptionStore.claim`), so they caption disjoint images and share the work; the claims of a worker
    that dies expire after ``lease_s`` seconds (at once for a dead process on the same host) and are taken over.

    Parameters
    ----------
    images : ImageCollection
    captioner : Captioner
    store : CaptionStore
        Opened for writing.
    batch_size : int or None
        Images per captioner call and per store transaction (``None``: the captioner's default). Streaming
        captioners (OpenAI-compatible servers) commit whatever finished, up to this many at a time.
    show_progress : bool
        Show a progress bar (images/s and ETA) on stderr.
    raise_on_failure : bool
        Raise :class:`~llmvem.errors.CaptionError` naming the failed images at the end (after storing all
        finished captions) instead of only reporting them in the summary.
    claim_size : int or None
        Images claimed at a time; ``None``: 4 x the requests in flight (streaming captioners) or the batch size,
        at least 16.
    lease_s : float
        Seconds a claim lasts without progress; every stored batch renews the worker's claims.

    Returns
    -------
    CaptionSummary
        ``done`` counts the images this process captioned.
    """
    config_hash = store.register(captioner)
    n = len(images)
    hashes = [images.content_hash(i) for i in
              (progress(range(n), desc="hashing images", total=n, unit="img") if show_progress and n > 1000
               else range(n))]
    first_index: dict[str, int] = {}
    for i, h in enumerate(hashes):
        first_index.setdefault(h, i)
    done_before = store.done_hashes(config_hash)
    remaining = [h for h in first_index if h not in done_before]
    logger.info("captioning up to %d of %d images with %s (config %s); %d already stored", len(remaining), n,
                captioner.model_id, config_hash, n - len(remaining))
    bs = batch_size or captioner.default_batch_size
    size = claim_size or max(16, bs, 4 * int(getattr(captioner, "max_in_flight", 0) or 0))

    bar = progress_bar(total=len(remaining), desc=f"captioning ({captioner.backend})", unit="img") \
        if show_progress else _NoBar()
    done = 0
    truncated = 0
    failures: list[CaptionResult] = []
    tried: set[str] = set()
    t0 = time.perf_counter()
    try:
        while True:
            claimed = store.claim(config_hash, remaining, size, lease_s=lease_s)
            if not claimed:
                break
            tried.update(claimed)
            for results in captioner.caption_collection(images, [first_index[h] for h in claimed], batch_size):
                good = [r for r in results if r.ok]
                store.add(config_hash, [(hashes[r.index], r.image_id, r.captions) for r in good])
                store.renew_claims(lease_s)
                failures.extend(r for r in results if not r.ok)
                done += len(good)
                truncated += sum(r.truncated for r in good)
                bar.update(len(results))
                if failures:
                    bar.set_postfix_str(f"failed={len(failures)}")
            finished = store.done_hashes(config_hash)
            remaining = [h for h in remaining if h not in tried and h not in finished]
    finally:
        bar.close()
        try:
            store.release_claims()
        except Exception:  # noqa: BLE001 - the claims expire anyway; keep the original error
            logger.debug("could not release the caption claims of this worker", exc_info=True)
    elapsed = time.perf_counter() - t0
    others = min(store.claimed_by_others(config_hash), n - done - len(failures))
    summary = CaptionSummary(
        n_images=n, done=done, skipped=n - done - len(failures) - others, failed=len(failures),
        failed_ids=[r.image_id for r in failures], errors={r.image_id: r.error or "no caption" for r in failures},
        truncated=truncated, config_hash=config_hash, elapsed_s=elapsed, others=others)
    if truncated:
        logger.warning("%d captions stopped at the token limit and are cut off; raise the limit "
                       "(--max-new-tokens) to get complete descriptions", truncated)
    if failures:
        logger.warning(describe_failures(failures))
        if raise_on_failure:
            raise CaptionError(describe_failures(failures) + f"; the {done} finished captions are stored in "
                               f"{store.path}, rerun to retry the failed images")
    return summary
