"""The caption store: captions in a SQLite file, keyed by image content and captioner configuration.

One row per (image content hash, captioner config hash, caption index) holding the caption text, the image id it
was made for, the model id, the prompt, the settings (JSON) and a UTC timestamp; a ``captioners`` table holds
each configuration once (identity and runtime options, never secrets).

Crash safety: the file is in WAL mode and the captions of each batch are committed in one small transaction as
they arrive, all captions of an image together. A crash, SIGKILL or Ctrl-C loses at most the batch in flight, never
leaves half an image, and a rerun skips every image already stored (:meth:`CaptionStore.done_hashes`). Readers in
other processes see a consistent snapshot while a caption job writes (WAL). ``synchronous=NORMAL`` survives any
crash of the process; after a power cut the last few transactions may be lost (and are redone by a rerun), the file
stays consistent. WAL needs every process on one host: a store opened for writing on a network file system (NFS,
SMB, ...) gets a one-line warning (:mod:`llmvem.captions.filesystem`); several machines scale out through several
servers behind one client.

Example
-------
>>> store = CaptionStore("captions.sqlite")                    # doctest: +SKIP
>>> caps = store.get(images.content_hashes(), config_hash)      # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from llmvem.captions.filesystem import network_filesystem
from llmvem.data.images import ImageCollection
from llmvem.errors import DataValidationError, DiskFullError, is_disk_full
from llmvem.utils import atomic_write, stable_hash

log = logging.getLogger(__name__)

SCHEMA_NAME = "llmvem-caption-store"
SCHEMA_VERSION = "1"
_CHUNK = 500  # host parameters per IN (...) query, well below SQLite's limit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS captioners (
    config_hash   TEXT PRIMARY KEY,
    backend       TEXT NOT NULL,
    model_id      TEXT NOT NULL,
    prompt        TEXT,
    settings_json TEXT NOT NULL,
    runtime_json  TEXT NOT NULL,
    created_at    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS captions (
    image_hash    TEXT NOT NULL,
    config_hash   TEXT NOT NULL REFERENCES captioners(config_hash),
    caption_index INTEGER NOT NULL,
    caption       TEXT NOT NULL CHECK (length(trim(caption)) > 0),
    image_id      TEXT NOT NULL,
    model_id      TEXT NOT NULL,
    prompt        TEXT,
    settings_json TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    PRIMARY KEY (image_hash, config_hash, caption_index)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS captions_by_config ON captions (config_hash, image_hash);
"""

# Work sharing between caption processes on one store: a worker claims images for a lease; a claim whose lease
# ran out (its worker died or hangs) or whose worker is a dead process on this host may be taken by another.
_CLAIMS = """
CREATE TABLE IF NOT EXISTS claims (
    image_hash  TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    worker      TEXT NOT NULL,
    expires_at  REAL NOT NULL,
    PRIMARY KEY (image_hash, config_hash)
) WITHOUT ROWID;
"""


def worker_id() -> str:
    """``host:pid`` of this process, the owner name of its claims."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _dead_local_worker(worker: str, host: str) -> bool:
    """True for a worker id of a process on this host that no longer exists."""
    name, _, pid = worker.rpartition(":")
    if name != host or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists but belongs to someone else
        return False
    return False


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class CaptionerRecord:
    """One captioner configuration as stored.

    Attributes
    ----------
    config_hash : str
    backend, model_id : str
    prompt : str or None
    settings : dict
        Hashed generation settings.
    runtime : dict
        Recorded, unhashed options (server URLs, device, API-key variable *name*...).
    created_at : str
        ISO-8601 UTC time the configuration was first registered.
    n_images : int
        Images with captions under this configuration.
    """

    config_hash: str
    backend: str
    model_id: str
    prompt: str | None
    settings: dict[str, Any]
    runtime: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""
    n_images: int = 0


class CaptionStore:
    """Captions in a SQLite file (created if absent).

    Parameters
    ----------
    path : str or Path
        The ``.sqlite`` file. Its folder is created if needed.
    readonly : bool
        Open without write access (the file must exist). Any number of read-only stores may read while one
        caption job writes.
    timeout_s : float
        How long a statement waits for another process's write lock before failing.

    Notes
    -----
    A store object belongs to the thread that made it. Use it as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | Path, readonly: bool = False, timeout_s: float = 30.0):
        self.path = Path(path)
        self.readonly = readonly
        self._records: dict[str, CaptionerRecord] = {}
        self._timeout_s = float(timeout_s)
        if readonly and not self.path.is_file():
            raise DataValidationError(self.path, "caption store", "file does not exist; run `llmvem caption` first")
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            remote = network_filesystem(self.path.parent)
            if remote is not None:  # WAL needs every process on one host (llmvem.captions.filesystem)
                log.warning("%s: the caption store is on a network file system (%s); SQLite is safe for several "
                            "processes on one machine only: do not share this store between machines (scale out "
                            "with several servers behind one client: repeat --base-url)", self.path, remote)
        try:
            if readonly:
                self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=timeout_s,
                                             isolation_level=None)
            else:
                self._conn = sqlite3.connect(self.path, timeout=timeout_s, isolation_level=None)
            self._init_schema()
        except sqlite3.DatabaseError as exc:
            if getattr(self, "_conn", None) is not None:
                self._conn.close()
            if is_disk_full(exc):
                raise DiskFullError(self.path.parent, f"the caption store {self.path.name}") from exc
            raise DataValidationError(self.path, "caption store",
                                      f"not a readable SQLite caption store ({exc})") from exc

    # ------------------------------------------------------------------- setup
    def _init_schema(self) -> None:
        c = self._conn
        c.execute(f"PRAGMA busy_timeout = {int(self._timeout_s * 1000)}")
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and "meta" not in tables:
            raise DataValidationError(self.path, "caption store",
                                      f"SQLite file with tables {sorted(tables)} is not an llmvem caption store")
        if "meta" in tables:
            meta = dict(c.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("schema") != SCHEMA_NAME:
                raise DataValidationError(self.path, "meta.schema",
                                          f"{meta.get('schema')!r}; expected {SCHEMA_NAME!r}")
            if meta.get("version") != SCHEMA_VERSION:
                raise DataValidationError(self.path, "meta.version", f"{meta.get('version')!r}; this llmvem reads "
                                          f"version {SCHEMA_VERSION!r}")
        if self.readonly:
            if not tables:
                raise DataValidationError(self.path, "caption store", "empty file; expected an llmvem caption store")
            return
        c.execute("PRAGMA journal_mode = WAL")
        c.execute("PRAGMA synchronous = NORMAL")
        c.execute("PRAGMA foreign_keys = ON")
        if not tables:
            # One script so that the schema and its version marker appear together or not at all.
            script = ("BEGIN IMMEDIATE;" + _SCHEMA
                      + f"INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', '{SCHEMA_NAME}'),"
                      f" ('version', '{SCHEMA_VERSION}'), ('created_at', '{_now()}');"
                      "COMMIT;")
            try:
                c.executescript(script)
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise
        c.executescript(_CLAIMS)  # stores written before work sharing get the table on their first write

    def close(self) -> None:
        """Close the connection (pending transactions were already committed)."""
        self._conn.close()

    def __enter__(self) -> CaptionStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CaptionStore({str(self.path)!r})"

    # ------------------------------------------------------------ captioners
    def register(self, captioner: Any) -> str:
        """Record a captioner's configuration (once) and return its config hash.

        ``captioner`` is a :class:`~llmvem.captions.base.Captioner` or a :class:`CaptionerRecord`. Registering the
        same identity again keeps the first record.
        """
        if isinstance(captioner, CaptionerRecord):
            rec = captioner
        else:
            ident = captioner.identity()
            rec = CaptionerRecord(config_hash=captioner.config_hash, backend=ident["backend"],
                                  model_id=ident["model_id"], prompt=ident["prompt"], settings=ident["settings"],
                                  runtime=captioner.runtime())
        if rec.config_hash != stable_hash({"backend": rec.backend, "model_id": rec.model_id, "prompt": rec.prompt,
                                           "settings": rec.settings}):
            raise ValueError(f"config hash {rec.config_hash} does not match the captioner's identity")
        with self._write():
            self._conn.execute(
                "INSERT OR IGNORE INTO captioners (config_hash, backend, model_id, prompt, settings_json, runtime_json,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (rec.config_hash, rec.backend, rec.model_id, rec.prompt,
                 json.dumps(rec.settings, sort_keys=True, default=str),
                 json.dumps(rec.runtime, sort_keys=True, default=str), rec.created_at or _now()))
        return rec.config_hash

    def configs(self) -> list[CaptionerRecord]:
        """All captioner configurations in the store, oldest first, with their image counts."""
        rows = self._conn.execute(
            "SELECT c.config_hash, backend, model_id, prompt, settings_json, runtime_json, created_at,"
            " (SELECT COUNT(DISTINCT image_hash) FROM captions k WHERE k.config_hash = c.config_hash)"
            " FROM captioners c ORDER BY created_at, config_hash").fetchall()
        return [CaptionerRecord(config_hash=r[0], backend=r[1], model_id=r[2], prompt=r[3],
                                settings=json.loads(r[4]), runtime=json.loads(r[5]), created_at=r[6], n_images=r[7])
                for r in rows]

    def config(self, config_hash: str | None = None) -> CaptionerRecord:
        """The record of ``config_hash`` (with its image count); with ``None``, the store's only configuration."""
        config_hash = self._resolve(config_hash)
        return next(r for r in self.configs() if r.config_hash == config_hash)

    def _record(self, config_hash: str) -> CaptionerRecord:
        """The stored record of ``config_hash`` without counting its images (cheap; used on every write)."""
        cached = self._records.get(config_hash)
        if cached is not None:
            return cached
        r = self._conn.execute(
            "SELECT config_hash, backend, model_id, prompt, settings_json, runtime_json, created_at"
            " FROM captioners WHERE config_hash = ?", (config_hash,)).fetchone()
        if r is None:
            known = [k[0] for k in self._conn.execute("SELECT config_hash FROM captioners ORDER BY created_at")]
            raise DataValidationError(self.path, "config_hash", f"{config_hash!r} is not in the store; it has "
                                      f"{known}; register the captioner first")
        rec = CaptionerRecord(config_hash=r[0], backend=r[1], model_id=r[2], prompt=r[3], settings=json.loads(r[4]),
                              runtime=json.loads(r[5]), created_at=r[6])
        self._records[config_hash] = rec
        return rec

    def _resolve(self, config_hash: str | None) -> str:
        known = [r[0] for r in self._conn.execute("SELECT config_hash FROM captioners ORDER BY created_at")]
        if config_hash is None:
            if len(known) == 1:
                return known[0]
            raise DataValidationError(
                self.path, "config_hash",
                f"the store holds {len(known)} captioner configurations {known}; say which one"
                if known else "the store holds no captions yet")
        if config_hash not in known:
            raise DataValidationError(self.path, "config_hash", f"{config_hash!r} is not in the store; it has {known}")
        return config_hash

    # ----------------------------------------------------------------- writes
    def _write(self):
        if self.readonly:
            raise DataValidationError(self.path, "caption store", "opened read-only; cannot write")
        return _Transaction(self._conn, self.path)

    def add(self, config_hash: str, items: Iterable[tuple[str, str, Sequence[str]]]) -> int:
        """Store captions in ONE transaction and return the number of images written.

        Parameters
        ----------
        config_hash : str
            A registered configuration (:meth:`register`).
        items : iterable of (image_hash, image_id, captions)
            ``captions`` is a non-empty sequence of non-empty strings. An image that already has captions
            under ``config_hash`` has them replaced (no duplicates ever).
        """
        rec = self._record(config_hash)
        settings_json = json.dumps(rec.settings, sort_keys=True, default=str)
        rows: list[tuple] = []
        hashes: list[str] = []
        now = _now()
        for image_hash, image_id, captions in items:
            caps = [str(c) for c in captions]
            if not caps:
                raise ValueError(f"image {image_id!r}: no captions to store")
            for k, cap in enumerate(caps):
                if not cap.strip():
                    raise ValueError(f"image {image_id!r}: caption {k} is empty")
                rows.append((image_hash, config_hash, k, cap, str(image_id), rec.model_id, rec.prompt,
                             settings_json, now))
            hashes.append(image_hash)
        if not rows:
            return 0
        with self._write():
            self._conn.executemany("DELETE FROM captions WHERE image_hash = ? AND config_hash = ?",
                                   [(h, config_hash) for h in hashes])
            self._conn.executemany(
                "INSERT INTO captions (image_hash, config_hash, caption_index, caption, image_id, model_id, prompt,"
                " settings_json, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        return len(set(hashes))

    # ------------------------------------------------------------ work sharing
    def claim(self, config_hash: str, wanted: Sequence[str], limit: int, lease_s: float = 120.0,
              worker: str | None = None) -> list[str]:
        """Claim up to ``limit`` of the image hashes ``wanted`` (in order) for this worker, in one transaction.

        An image is claimable when it has no captions under ``config_hash`` and no live claim of another worker
        (claims expire ``lease_s`` seconds after they were made or renewed; claims of dead processes on this host
        are taken over at once). Several ``llmvem caption`` processes on one store thus caption disjoint images.

        Returns
        -------
        list of str
            The hashes claimed, a subset of ``wanted`` in its order (empty when nothing is left to claim).
        """
        me = worker or worker_id()
        host = socket.gethostname()
        now = time.time()
        got: list[str] = []
        with self._write():
            self._conn.execute("DELETE FROM claims WHERE expires_at < ?", (now,))
            others = self._conn.execute("SELECT DISTINCT worker FROM claims WHERE worker != ?", (me,)).fetchall()
            for (other,) in others:
                if _dead_local_worker(other, host):
                    self._conn.execute("DELETE FROM claims WHERE worker = ?", (other,))
            for start in range(0, len(wanted), _CHUNK):
                if len(got) >= limit:
                    break
                chunk = list(wanted[start : start + _CHUNK])
                marks = ",".join("?" * len(chunk))
                taken = {r[0] for r in self._conn.execute(
                    f"SELECT image_hash FROM claims WHERE config_hash = ? AND worker != ? AND image_hash IN ({marks})"
                    f" UNION SELECT image_hash FROM captions WHERE config_hash = ? AND image_hash IN ({marks})",
                    (config_hash, me, *chunk, config_hash, *chunk))}
                got.extend(h for h in chunk if h not in taken and h not in got)
            got = got[:limit]
            self._conn.executemany(
                "INSERT OR REPLACE INTO claims (image_hash, config_hash, worker, expires_at) VALUES (?, ?, ?, ?)",
                [(h, config_hash, me, now + lease_s) for h in got])
        return got

    def renew_claims(self, lease_s: float = 120.0, worker: str | None = None) -> None:
        """Extend the leases of all claims of this worker (a heartbeat while it works)."""
        with self._write():
            self._conn.execute("UPDATE claims SET expires_at = ? WHERE worker = ?",
                               (time.time() + lease_s, worker or worker_id()))

    def release_claims(self, worker: str | None = None) -> None:
        """Drop all claims of this worker (done, failed or interrupted: the images are free for others)."""
        with self._write():
            self._conn.execute("DELETE FROM claims WHERE worker = ?", (worker or worker_id(),))

    def claimed_by_others(self, config_hash: str, worker: str | None = None) -> int:
        """Images under a live claim of another worker (being captioned elsewhere right now)."""
        return int(self._conn.execute(
            "SELECT COUNT(*) FROM claims WHERE config_hash = ? AND worker != ? AND expires_at >= ?",
            (config_hash, worker or worker_id(), time.time())).fetchone()[0])

    # ------------------------------------------------------------------ reads
    def done_hashes(self, config_hash: str) -> set[str]:
        """Content hashes of the images that have captions under ``config_hash``."""
        return {r[0] for r in self._conn.execute(
            "SELECT DISTINCT image_hash FROM captions WHERE config_hash = ?", (config_hash,))}

    def _fetch(self, hashes: Sequence[str], config_hash: str) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        unique = list(dict.fromkeys(hashes))
        for start in range(0, len(unique), _CHUNK):
            chunk = unique[start : start + _CHUNK]
            marks = ",".join("?" * len(chunk))
            for h, cap in self._conn.execute(
                    f"SELECT image_hash, caption FROM captions WHERE config_hash = ? AND image_hash IN ({marks})"
                    " ORDER BY image_hash, caption_index", (config_hash, *chunk)):
                found.setdefault(h, []).append(cap)
        return found

    def get(self, hashes: Sequence[str], config_hash: str | None = None,
            missing: Literal["error", "empty"] = "error") -> list[list[str]]:
        """Captions of the images with content ``hashes`` under one configuration.

        Parameters
        ----------
        hashes : sequence of str, length n
            Image content hashes (:meth:`ImageCollection.content_hashes`).
        config_hash : str or None
            The configuration; ``None`` when the store holds exactly one.
        missing : {"error", "empty"}
            What to do for images without captions: raise :class:`DataValidationError` naming how many and the
            first one, or give an empty list.

        Returns
        -------
        list of length n of lists of str, captions in the order they were written.
        """
        config_hash = self._resolve(config_hash)
        found = self._fetch(hashes, config_hash)
        out = [list(found.get(h, [])) for h in hashes]
        if missing == "error":
            absent = [i for i, caps in enumerate(out) if not caps]
            if absent:
                raise DataValidationError(
                    self.path, "captions",
                    f"{len(absent)} of {len(hashes)} images have no captions under captioner config {config_hash} "
                    f"(first: position {absent[0]}, hash {hashes[absent[0]]}); run `llmvem caption` on these "
                    "images with the same settings first")
        return out

    def get_for(self, images: ImageCollection, config_hash: str | None = None,
                missing: Literal["error", "empty"] = "error") -> list[list[str]]:
        """:meth:`get` for every image of a collection (in collection order); errors name the image ids."""
        hashes = images.content_hashes()
        try:
            return self.get(hashes, config_hash, missing)
        except DataValidationError:
            found = self._fetch(hashes, self._resolve(config_hash))
            absent = [images.ids[i] for i, h in enumerate(hashes) if h not in found]
            raise DataValidationError(
                self.path, "captions",
                f"{len(absent)} of {len(images)} images have no captions under captioner config "
                f"{self._resolve(config_hash)} (first ids: {absent[:5]}); run `llmvem caption` on them first") from None

    def coverage(self, hashes: Sequence[str]) -> dict[str, int]:
        """How many of ``hashes`` (distinct) have captions, per configuration: ``{config_hash: n_present}``.

        Use it to check that a store belongs to a dataset: a store made for other images has 0 everywhere.
        """
        wanted = set(hashes)
        return {rec.config_hash: len(wanted & self.done_hashes(rec.config_hash)) for rec in self.configs()}

    def count(self, config_hash: str | None = None) -> int:
        """Number of caption rows (all configurations, or one)."""
        if config_hash is None:
            return int(self._conn.execute("SELECT COUNT(*) FROM captions").fetchone()[0])
        return int(self._conn.execute("SELECT COUNT(*) FROM captions WHERE config_hash = ?",
                                      (config_hash,)).fetchone()[0])

    def rows(self, config_hash: str | None = None) -> list[dict[str, Any]]:
        """All caption rows (one configuration, or all) as dicts, ordered by image id, hash and caption index."""
        sql = ("SELECT image_id, image_hash, config_hash, caption_index, caption, model_id, prompt, created_at"
               " FROM captions")
        args: tuple = ()
        if config_hash is not None:
            sql += " WHERE config_hash = ?"
            args = (self._resolve(config_hash),)
        sql += " ORDER BY image_id, image_hash, config_hash, caption_index"
        keys = ("image_id", "image_hash", "config_hash", "caption_index", "caption", "model_id", "prompt",
                "created_at")
        return [dict(zip(keys, r, strict=True)) for r in self._conn.execute(sql, args)]

    # ----------------------------------------------------------------- export
    def export(self, path: str | Path, config_hash: str | None = None) -> Path:
        """Write captions to ``.csv`` or ``.json`` (by suffix), atomically; return the path.

        CSV: one row per caption with columns ``image_id, image_hash, config_hash, caption_index, caption,
        model_id, created_at`` (readable back by :func:`llmvem.captions.existing.read_caption_file`).
        JSON: ``{"captioners": [...], "images": [{"image_id", "image_hash", "config_hash", "captions": [...]}]}``.
        ``config_hash=None`` exports every configuration.
        """
        path = Path(path)
        rows = self.rows(config_hash)
        suffix = path.suffix.lower()
        if suffix == ".csv":
            cols = ["image_id", "image_hash", "config_hash", "caption_index", "caption", "model_id", "created_at"]
            with atomic_write(path, newline="", encoding="utf-8") as fh:
                w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
        elif suffix == ".json":
            images: dict[tuple[str, str], dict[str, Any]] = {}
            for r in rows:
                key = (r["image_hash"], r["config_hash"])
                rec = images.setdefault(key, {"image_id": r["image_id"], "image_hash": r["image_hash"],
                                              "config_hash": r["config_hash"], "captions": []})
                rec["captions"].append(r["caption"])
            configs = [vars(c) for c in self.configs()
                       if config_hash is None or c.config_hash == self._resolve(config_hash)]
            with atomic_write(path, encoding="utf-8") as fh:
                json.dump({"captioners": configs, "images": list(images.values())}, fh, indent=1,
                          ensure_ascii=False)
                fh.write("\n")
        else:
            raise DataValidationError(path, "export path", f"suffix {path.suffix!r}; expected .csv or .json")
        return path


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any exception (Ctrl-C included).

    A full disk (SQLite's "database or disk is full") becomes :class:`~llmvem.errors.DiskFullError` naming the
    store's folder; the transaction is rolled back, so the store keeps every earlier batch.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path):
        self.conn = conn
        self.path = path

    def __enter__(self) -> sqlite3.Connection:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            self._raise_disk_full(exc)
            raise
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
            except sqlite3.OperationalError as err:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                self._raise_disk_full(err)
                raise
            return
        if self.conn.in_transaction:
            self.conn.execute("ROLLBACK")
        if exc is not None:
            self._raise_disk_full(exc)

    def _raise_disk_full(self, exc: BaseException) -> None:
        if is_disk_full(exc):
            raise DiskFullError(self.path.parent, f"captions to {self.path.name}") from exc
