"""File IO: the one atomic writer, and safetensors files with checksums, loaded without pickle.

Every file hyperloom writes goes through :func:`atomic_write_files` (temporary files written in full
and fsynced, then renamed over their targets in a given order, the directories fsynced; a failure
puts back what it replaced): model and training checkpoints, LoRA and PEFT adapter directories,
their JSON configs, tables and figures. Bad paths are :class:`CheckpointError` naming the path.

The safetensors format (https://github.com/huggingface/safetensors) is read and written by the
``safetensors`` package (``safetensors.serialize`` / ``safetensors.deserialize``, torch tensors
only, no numpy): it validates the header, the dtypes, the shapes and the data offsets of every
file it reads. What is hyperloom's sits on top: every tensor's SHA-256 (over its dtype, shape and
bytes) is stored in the ``__metadata__`` under ``hyperloom.sha256``, and the SHA-256 of the rest of
the metadata under ``hyperloom.metadata_sha256``, so a flipped byte in the data or the metadata is
caught on load. Files without checksums (written by other tools) still load.

The model and training formats built on these files are in :mod:`hyperloom.checkpoint`.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import HyperloomError, short_repr

# the dtypes a checkpoint can hold: safetensors' name -> torch dtype (those this torch has)
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "C64": torch.complex64,
}
for _name, _attr in (
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu"),
):
    if isinstance(getattr(torch, _attr, None), torch.dtype):  # newer dtypes: only where this torch has them
        _DTYPES[_name] = getattr(torch, _attr)
_NAMES = {v: k for k, v in _DTYPES.items()}
_CHECKSUMS = "hyperloom.sha256"
_META_CHECKSUM = "hyperloom.metadata_sha256"  # a key of its own: earlier versions read it as plain metadata

# what the safetensors package's refusals mean, in the words of this library (its own message follows)
_PACKAGE_ERRORS = (
    ("header too small", "truncated checkpoint ({size} bytes, no header)"),
    ("header too large", "truncated or corrupt checkpoint (header of {n} bytes, file of {size})"),
    ("invalid header length", "truncated or corrupt checkpoint (header of {n} bytes, file of {size})"),
    ("invalid json in header", "corrupt checkpoint header"),
    ("invalid utf-8 in header", "corrupt checkpoint header"),
    ("invalid header start", "corrupt checkpoint header"),
    ("file not fully covered", "truncated or tampered checkpoint (the tensors' data offsets do not cover its data section exactly)"),
    ("invalid shape, data type, or offset", "corrupt checkpoint header (a tensor's shape, dtype and data offsets do not fit together)"),
    ("invalid offset", "corrupt checkpoint header (tensor data offsets overlap, leave gaps or point outside the file)"),
)


class CheckpointError(HyperloomError):
    """A checkpoint file is missing, truncated, tampered with or does not match the model."""


def _fsync_dir(path: Path) -> None:
    if sys.platform.startswith("win"):  # pragma: no cover - no directory fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cannot_write(target: Path, why: str) -> CheckpointError:
    return CheckpointError(f"{target}: cannot write checkpoint ({why})")


def _why(e: OSError) -> str:
    return e.strerror or str(e)


def _as_path(path: Any) -> Path:
    """``path`` as a :class:`~pathlib.Path`, or a :class:`CheckpointError` for what no file system takes."""
    if not isinstance(path, str | os.PathLike):
        raise CheckpointError(f"checkpoint path must be a str or os.PathLike, got {type(path).__name__} {short_repr(path)}")
    try:
        p = Path(path)
    except TypeError:  # an os.PathLike of bytes
        raise CheckpointError(f"checkpoint path must be a str or os.PathLike of str, got {short_repr(path)}") from None
    if "\0" in str(p):
        raise CheckpointError(f"{str(p)!r}: invalid checkpoint path (it contains a NUL byte)")
    return p


def _make_dir(directory: Path, label: Path) -> None:
    """Create ``directory`` (and its parents), or a :class:`CheckpointError` naming ``label``."""
    try:
        if directory.exists() and not directory.is_dir():
            raise _cannot_write(label, f"{directory} is a file, not a directory")
        for parent in directory.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise _cannot_write(label, f"{parent} is a file, not a directory")
                break
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cannot_write(label, _why(e)) from e


def _stage(target: Path, data: Sequence[bytes | bytearray | memoryview]) -> str:
    """Write ``data`` to a new temporary file beside ``target``, fsynced; return its path (removed on failure)."""
    try:
        if target.is_dir():
            raise _cannot_write(target, "it is a directory")
        _make_dir(target.parent, target)
        # a short prefix: the temporary name must fit the file system wherever the target's name does
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:32]}.", suffix=".tmp", dir=target.parent)
    except OSError as e:
        raise _cannot_write(target, _why(e)) from e
    try:
        with os.fdopen(fd, "wb") as f:
            for c in data:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _cannot_write(target, _why(e)) from e
        raise
    return tmp


# os.link's refusals on file systems without hard links (FAT, exFAT, some network file systems)
_NO_LINKS = {errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}


def atomic_write_files(files: Mapping[str | os.PathLike[str], Sequence[bytes | bytearray | memoryview]]) -> None:
    """Write several files so that a failure leaves every old file as it was: the library's one writer.

    Every file the library writes goes through here (checkpoints, LoRA and PEFT directories, JSON
    configs, CSV tables, figures). Each file is first written in full to a temporary file beside it and
    fsynced; only when all are on disk are they renamed over their targets, **in the order given** (give a
    directory's index, e.g. its config, last), and the directories are fsynced. Any failure (a full disk,
    no permission, a rename refused) removes the temporary files and puts back the files already
    replaced, so the old set is left complete (on a file system without hard links the old files cannot
    be kept aside: there only a failure before the first rename leaves them all); a crash (power loss) can
    at worst fall between two renames. Files that are not replaced are never touched.

    Args:
        files: Target path -> the file's bytes, as a sequence of chunks (written in order).

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> atomic_write_files({os.path.join(d, "a.bin"): [b"ab", b"c"], os.path.join(d, "a.json"): [b"{}"]})
        >>> sorted(os.listdir(d))
        ['a.bin', 'a.json']

    Raises:
        CheckpointError: Naming the file, if one cannot be written (its directory is a file, it is a
            directory, no permission, disk full) or renamed; no old file is changed then.
    """
    targets = [_as_path(p) for p in files]
    if len(set(targets)) != len(targets):
        raise CheckpointError(f"the same file is given twice: {[str(t) for t in targets]}")
    staged: list[tuple[str, Path]] = []
    try:
        for target, data in zip(targets, files.values(), strict=True):
            staged.append((_stage(target, data), target))
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise
    backups: dict[Path, str] = {}
    done: list[Path] = []
    try:
        for _, target in staged if len(staged) > 1 else []:  # one file: the rename alone is atomic
            if target.exists():
                bk = f"{target.parent}/.{target.name[:32]}.{os.urandom(8).hex()}.bak"
                try:
                    os.link(target, bk)  # a second name for the old file: no data is copied
                except OSError as e:
                    if e.errno not in _NO_LINKS:
                        raise
                    continue  # a file system without hard links: no way back for this file if a later rename fails
                backups[target] = bk
        for tmp, target in staged:
            os.replace(tmp, target)
            done.append(target)
    except BaseException as e:
        for target in reversed(done):  # put the old files back (or remove a new one that had none)
            try:
                if target in backups:
                    os.replace(backups.pop(target), target)
                else:
                    target.unlink(missing_ok=True)
            except OSError:  # pragma: no cover - the old file keeps its second name, which the message gives
                pass
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        left = {str(t): b for t, b in backups.items() if t in done}
        for t, b in backups.items():
            if str(t) not in left:
                Path(b).unlink(missing_ok=True)
        if isinstance(e, OSError):
            target = next((t for _, t in staged if t not in done), staged[-1][1])
            extra = f"; the old files are kept as {left}" if left else ""
            raise _cannot_write(target, _why(e) + extra) from e
        raise
    for bk in backups.values():
        Path(bk).unlink(missing_ok=True)
    for d in dict.fromkeys(t.parent for t in targets):
        try:
            _fsync_dir(d)
        except OSError as e:  # pragma: no cover - the files are in place; only their durability is in doubt
            raise _cannot_write(d, f"fsync of the directory failed: {_why(e)}") from e


def atomic_write_bytes(path: str | os.PathLike[str], chunks: Sequence[bytes | bytearray | memoryview]) -> None:
    """Write ``chunks`` to ``path`` atomically (temporary file, fsync, rename, fsync of the directory).

    One file through :func:`atomic_write_files`.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "x.bin")
        >>> atomic_write_bytes(p, [b"hello"])
        >>> from pathlib import Path
        >>> Path(p).read_bytes()
        b'hello'

    Raises:
        CheckpointError: Naming the file, if it cannot be written (its directory is a file, it is a
            directory, no permission, disk full); a file already there is left as it was.
    """
    atomic_write_files({path: chunks})


def write_figure(fig: Any, path: str | os.PathLike[str], *, where: str) -> Path:
    """Save a matplotlib ``Figure`` to ``path`` atomically, in the format its suffix names (none: PNG).

    Raises:
        HyperloomError: Naming ``where`` and the path, if matplotlib cannot write that format (the supported
            suffixes are listed); nothing is written then.
        CheckpointError: Naming the path, if it cannot be written (see :func:`atomic_write_bytes`).
    """
    import io

    out = Path(path)
    fmt = out.suffix[1:].lower() or "png"
    supported = fig.canvas.get_supported_filetypes()
    if fmt not in supported:
        raise HyperloomError(f"{where}: cannot save a figure as {fmt!r} ({out}); supported suffixes: {sorted(supported)}")
    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, format=fmt)
    atomic_write_bytes(out, [buf.getvalue()])  # the library's one writer, as for every file it writes
    return out


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_write_bytes`.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "x.json")
        >>> atomic_write_text(p, "ok")
        >>> from pathlib import Path
        >>> Path(p).read_text()
        'ok'

    Raises:
        CheckpointError: As :func:`atomic_write_bytes`.
    """
    atomic_write_bytes(path, [text.encode("utf-8")])


def _digest(dtype: str, shape: list[int], data: bytes | bytearray | memoryview) -> str:
    h = hashlib.sha256(json.dumps([dtype, shape]).encode())
    h.update(data)
    return h.hexdigest()


def _meta_digest(meta: Mapping[str, str]) -> str:
    """The checksum of the metadata (all of it but the checksums), independent of its order and JSON spelling."""
    return hashlib.sha256(json.dumps(sorted(meta.items()), separators=(",", ":")).encode()).hexdigest()


def _check_storable(path: Path, name: str, t: Any) -> None:
    """Raise naming the file and the tensor if ``t`` is not a tensor this format can store."""
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"{path}: {name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.is_meta:
        raise CheckpointError(f"{path}: {name}: tensor on the meta device has no data to save")
    if t.is_nested:
        raise CheckpointError(f"{path}: {name}: nested tensors cannot be stored (unbind them into separate tensors)")
    if t.layout != torch.strided:
        raise CheckpointError(f"{path}: {name}: tensors of layout {t.layout} cannot be stored (convert with .to_dense())")
    if t.dtype not in _NAMES:
        raise CheckpointError(f"{path}: {name}: dtype {t.dtype} cannot be stored in a safetensors checkpoint")


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy (valid while ``t`` lives)."""
    n = t.numel() * t.element_size()
    if not n:
        return memoryview(b"")
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


def _package_error(p: Path, blob: bytes, e: BaseException) -> CheckpointError:
    """A :class:`CheckpointError` naming ``p`` for a file the ``safetensors`` package refused."""
    msg = str(e)
    low = msg.lower()
    n = int.from_bytes(blob[:8], "little") if len(blob) >= 8 else None
    for key, words in _PACKAGE_ERRORS:
        if key in low:
            return CheckpointError(f"{p}: {words.format(size=len(blob), n=n)} (safetensors: {msg})")
    return CheckpointError(f"{p}: not a valid safetensors file (safetensors: {type(e).__name__}: {msg})")


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *, metadata: Mapping[str, str] | None = None
) -> None:
    """Save tensors (any device; copied to CPU) to a safetensors file, atomically, with checksums.

    The file is written by the ``safetensors`` package; hyperloom adds the SHA-256 checksums of every
    tensor and of the metadata (checked by :func:`load_safetensors`) and writes it atomically (temporary
    file, fsync, rename). Tensors that share memory (tied weights) are each stored with their values.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
        >>> save_safetensors({"w": torch.ones(2, 3)}, p, metadata={"step": "7"})
        >>> t, meta = load_safetensors(p)
        >>> t["w"].shape, meta["step"]
        (torch.Size([2, 3]), '7')

    Raises:
        CheckpointError: Naming the file (and the tensor), before anything is written, on a name that is not
            a string or is ``__metadata__``, a value that is not a dense tensor with data (sparse, nested and
            meta-device tensors are refused), a dtype the format cannot store, a non-string metadata key or
            value, the metadata keys reserved for the checksums (``hyperloom.sha256``,
            ``hyperloom.metadata_sha256``), or a path that cannot be written.
    """
    target = _as_path(path)
    atomic_write_bytes(target, [safetensors_bytes(tensors, target, metadata=metadata)])


def safetensors_bytes(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *, metadata: Mapping[str, str] | None = None
) -> bytes:
    """The bytes :func:`save_safetensors` writes (with the checksums), for :func:`atomic_write_files`.

    ``path`` names the file in error messages only.

    Raises:
        CheckpointError: As :func:`save_safetensors`, but nothing is written.
    """
    from safetensors import SafetensorError, TensorSpec, serialize

    target = _as_path(path)
    specs: dict[str, Any] = {}
    sums: dict[str, str] = {}
    alive: list[torch.Tensor] = []  # serialize() reads raw pointers: the CPU copies must outlive it
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise CheckpointError(f"{target}: tensor names must be strings, got {type(name).__name__} {short_repr(name)}")
        if name == "__metadata__":
            raise CheckpointError(f"{target}: tensor name '__metadata__' is reserved for the metadata")
        _check_storable(target, name, t)
        # resolve the lazy negation and conjugation bits: data_ptr() shows the bytes before them
        data = t.detach().to("cpu").resolve_neg().resolve_conj().contiguous()
        if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
            raise CheckpointError("big-endian hosts are not supported")
        alive.append(data)
        raw = _bytes_of(data)
        specs[name] = TensorSpec(
            dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape), data_ptr=data.data_ptr(), data_len=len(raw)
        )
        sums[name] = _digest(_NAMES[t.dtype], list(t.shape), raw)
    meta = dict(metadata or {})
    bad = [k for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise CheckpointError(f"{target}: metadata keys and values must be strings, not for {bad}")
    for key in (_CHECKSUMS, _META_CHECKSUM):
        if key in meta:
            raise CheckpointError(f"{target}: metadata key {key!r} is reserved for the checksums")
    meta_sum = _meta_digest(meta)
    meta[_CHECKSUMS] = json.dumps(sums, separators=(",", ":"))
    meta[_META_CHECKSUM] = meta_sum
    try:
        return bytes(serialize(specs, metadata=meta))
    except SafetensorError as e:  # pragma: no cover - every tensor and key was checked above
        raise CheckpointError(f"{target}: the safetensors package refused to serialise the checkpoint ({e})") from None
    finally:
        del alive


def _read(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Load and validate a safetensors file; return ``(tensors, metadata, unchecked)``.

    ``unchecked`` names what the file carries no checksum for (``tensors``, ``metadata``): empty for the
    files this version writes, ``["metadata"]`` for those of earlier versions, both for other tools'.
    """
    from safetensors import deserialize

    try:
        blob = p.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read checkpoint ({e.strerror or e})") from None
    try:
        entries: list[tuple[str, dict[str, Any]]] = deserialize(blob)  # type: ignore[no-untyped-call]  # untyped in its stub
    except BaseException as e:  # SafetensorError, and a Rust panic (pyo3's PanicException is a BaseException)
        if isinstance(e, KeyboardInterrupt | SystemExit | GeneratorExit | MemoryError):
            raise
        raise _package_error(p, blob, e) from None
    # the package exposes no metadata for bytes in memory; it has validated the header it sits in
    n = int.from_bytes(blob[:8], "little")
    try:
        meta = json.loads(blob[8 : 8 + n]).get("__metadata__") or {}
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, AttributeError) as e:  # pragma: no cover - validated above
        raise CheckpointError(f"{p}: corrupt checkpoint header ({e})") from None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):  # pragma: no cover - validated above
        raise CheckpointError(f"{p}: corrupt checkpoint metadata")
    meta = dict(meta)
    names = [name for name, _ in entries]
    sums: dict[str, Any] | None = None
    unchecked = []
    raw_sums, meta_sum = meta.pop(_CHECKSUMS, None), meta.pop(_META_CHECKSUM, None)
    if meta_sum is None:  # written before the metadata was checksummed, or by another tool
        unchecked.append("metadata")
    elif meta_sum != _meta_digest(meta):
        raise CheckpointError(f"{p}: metadata checksum mismatch (tampered or corrupt file)")
    if raw_sums is None:
        if meta_sum is not None:  # hyperloom writes both or (earlier versions) the tensors' alone
            raise CheckpointError(f"{p}: the metadata has a checksum but the tensors have none (tampered file)")
        unchecked.insert(0, "tensors")
    else:
        try:
            sums = json.loads(raw_sums)
        except (json.JSONDecodeError, RecursionError):
            sums = None
        if not isinstance(sums, dict):
            raise CheckpointError(f"{p}: corrupt checksums in the checkpoint metadata (tampered file)")
        missing, unexpected = sorted(set(names) - set(sums)), sorted(set(sums) - set(names))
        if missing or unexpected:
            raise CheckpointError(
                f"{p}: the checksums do not match the tensors (tampered file): no checksum for {missing[:8]}, "
                f"checksums of absent tensors {unexpected[:8]}"
            )
    out: dict[str, torch.Tensor] = {}
    for name, info in entries:
        dtype_name, shape, data = info["dtype"], list(info["shape"]), info["data"]
        if dtype_name not in _DTYPES:
            raise CheckpointError(f"{p}: {name}: unsupported dtype {dtype_name!r} (this torch reads {sorted(_DTYPES)})")
        if sums is not None and sums[name] != _digest(dtype_name, shape, data):
            raise CheckpointError(f"{p}: {name}: checksum mismatch (tampered or corrupt file)")
        dtype = _DTYPES[dtype_name]
        # ``data`` is a fresh, writable bytearray the tensor may own
        out[name] = torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape) if len(data) else torch.empty(shape, dtype=dtype)
    return out, meta, unchecked


def load_safetensors(path: str | os.PathLike[str], *, require_checksums: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file (read by the ``safetensors`` package, never unpickled), checking its checksums.

    Args:
        path: The file.
        require_checksums: Refuse a file without hyperloom's checksums of its tensors and metadata (one
            written by another tool or an earlier version, or one whose checksums were removed).

    Returns:
        ``(tensors, metadata)``: CPU tensors by name, and the metadata without hyperloom's checksums.

    Raises:
        CheckpointError: Naming the file, if it is missing or the package refuses it (truncated, a header
            that is malformed, inconsistent, overlapping or leaves trailing bytes; the package's message is
            quoted), if it holds a dtype this torch does not have (naming the tensor), if the checksum of its
            metadata or (naming the tensor too) of a tensor does not match (a tampered or corrupt file), or if
            checksums are required and missing.
    """
    p = _as_path(path)
    tensors, meta, unchecked = _read(p)
    if require_checksums and unchecked:
        raise CheckpointError(f"{p}: checksums required, but the file has none for its {' and '.join(unchecked)}")
    return tensors, meta


__all__ = [
    "CheckpointError",
    "atomic_write_bytes",
    "atomic_write_files",
    "atomic_write_text",
    "load_safetensors",
    "safetensors_bytes",
    "save_safetensors",
]
