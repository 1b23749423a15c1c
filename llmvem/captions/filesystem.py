"""Is the caption store on a network file system?

SQLite in WAL mode (the caption store's journal) keeps its index in shared memory: every process that opens the
store must run on the same host, and SQLite's locking is unreliable over NFS, SMB and similar file systems. Several
``llmvem caption`` processes on one machine may share a store; several machines scale out through several
servers behind one client (``--base-url`` repeated), not through one store on a network file system.
:func:`network_filesystem` names the file system type under a path when it is such a one (Linux:
``/proc/self/mountinfo``), so the store can say so in one line.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["NETWORK_FILESYSTEMS", "filesystem_type", "network_filesystem"]

#: File system types (as ``/proc/self/mountinfo`` names them) on which several hosts may open one file.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs", "lustre", "gpfs", "beegfs",
    "pvfs2", "orangefs", "davfs", "fuse.sshfs", "fuse.glusterfs", "fuse.cephfs", "fuse.s3fs", "fuse.gcsfuse",
    "fuse.rclone", "fuse.juicefs", "fuse.davfs2",
})


def _unescape(field: str) -> str:
    """Mount points in mountinfo escape space, tab, newline and backslash as octal (``\\040``)."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        field = field.replace(code, char)
    return field


def filesystem_type(path: str | Path, mountinfo: str | None = None) -> str | None:
    """The type of the file system holding ``path`` (its nearest existing folder), or None when unknown.

    Parameters
    ----------
    path : str or Path
    mountinfo : str, optional
        The text of ``/proc/self/mountinfo`` (read from the system when None; tests pass their own).
    """
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:  # not Linux
            return None
    probe = Path(path).expanduser().absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        target = probe.resolve()
    except OSError:
        return None
    best: tuple[int, str] | None = None
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields or len(fields) < 5:
            continue
        mount, kind = Path(_unescape(fields[4])), fields[fields.index("-") + 1]
        if (target == mount or mount in target.parents) and (best is None or len(mount.parts) >= best[0]):
            best = (len(mount.parts), kind)  # the deepest mount wins; a later one of equal depth covers it
    return None if best is None else best[1]


def network_filesystem(path: str | Path, mountinfo: str | None = None) -> str | None:
    """The network file system type under ``path`` (``"nfs4"``, ``"cifs"``, ...), or None for a local one."""
    kind = filesystem_type(path, mountinfo)
    if kind is None:
        return None
    return kind if kind in NETWORK_FILESYSTEMS or kind.startswith(("nfs", "smb")) else None
