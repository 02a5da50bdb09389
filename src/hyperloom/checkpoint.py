"""Checkpoints in the safetensors format, written atomically, loaded without pickle.

The format (https://github.com/huggingface/safetensors) is an 8-byte
little-endian header length, a JSON header (``name -> {dtype, shape,
data_offsets}`` plus an optional ``__metadata__`` string map) and the raw
little-endian tensor bytes. It is implemented here with torch alone, so the
core keeps no dependency beyond torch; files interoperate with the
``safetensors`` package (checked in the tests).

Writes go to a temporary file in the same directory, are fsynced, then
renamed over the target: a crash leaves either the old file or the new one,
never a torn one. Loads validate the whole header against the file size
before touching any tensor and raise :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import HyperloomError

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
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 2**20


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


def atomic_write_bytes(path: str | os.PathLike[str], chunks: list[bytes]) -> None:
    """Write ``chunks`` to ``path`` atomically (temporary file, fsync, rename, fsync of the directory)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for c in chunks:
                f.write(c)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str], *, metadata: Mapping[str, str] | None = None
) -> None:
    """Save tensors (any device; copied to CPU) to a safetensors file, atomically.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "t.safetensors")
        >>> save_safetensors({"w": torch.ones(2, 3)}, p, metadata={"step": "7"})
        >>> t, meta = load_safetensors(p)
        >>> t["w"].shape, meta["step"]
        (torch.Size([2, 3]), '7')

    Raises:
        CheckpointError: On a dtype the format cannot store or a non-string metadata value.
    """
    header: dict[str, Any] = {}
    blobs: list[bytes] = []
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _NAMES:
            raise CheckpointError(f"{name}: dtype {t.dtype} cannot be stored in a safetensors checkpoint")
        data = t.detach().to("cpu").contiguous()
        if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
            raise CheckpointError("big-endian hosts are not supported")
        n = data.numel() * data.element_size()
        blobs.append(ctypes.string_at(data.data_ptr(), n) if n else b"")  # torch only: no numpy needed
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(v, str)]
        if bad:
            raise CheckpointError(f"metadata values must be strings, not for {bad}")
        header["__metadata__"] = dict(metadata)
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)  # align the data section to 8 bytes
    atomic_write_bytes(path, [len(hbytes).to_bytes(8, "little"), hbytes, *blobs])


def load_safetensors(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file after validating its header against the file size (no pickle).

    Returns:
        ``(tensors, metadata)``.

    Raises:
        CheckpointError: Naming the file, if it is missing, truncated, or its header is malformed,
            inconsistent, overlapping or has trailing bytes.
    """
    p = Path(path)
    try:
        blob = p.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{p}: cannot read checkpoint ({e.strerror})") from None
    if len(blob) < 8:
        raise CheckpointError(f"{p}: truncated checkpoint ({len(blob)} bytes, no header)")
    n = int.from_bytes(blob[:8], "little")
    if n > _MAX_HEADER or 8 + n > len(blob):
        raise CheckpointError(f"{p}: truncated or corrupt checkpoint (header of {n} bytes, file of {len(blob)})")
    try:
        header = json.loads(blob[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p}: corrupt checkpoint header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{p}: corrupt checkpoint header (not a JSON object)")
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{p}: corrupt checkpoint metadata")
    data = memoryview(blob)[8 + n :]
    spans = []
    out: dict[str, torch.Tensor] = {}
    for name, info in header.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            shape = [int(d) for d in info["shape"]]
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{p}: corrupt header entry for {name!r}: {info!r}") from None
        numel = 1
        for d in shape:
            if d < 0:
                raise CheckpointError(f"{p}: {name}: negative dimension in shape {shape}")
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if not (0 <= start <= end <= len(data)) or end - start != nbytes:
            raise CheckpointError(
                f"{p}: {name}: data offsets [{start}, {end}) do not fit shape {shape} of {info['dtype']} "
                f"in a data section of {len(data)} bytes (truncated or tampered file)"
            )
        spans.append((start, end, name))
        buf = torch.frombuffer(bytearray(data[start:end]), dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        out[name] = buf.view(dtype).reshape(shape).clone() if nbytes else torch.empty(shape, dtype=dtype)
    spans.sort()
    pos = 0
    for start, end, name in spans:
        if start != pos:
            raise CheckpointError(f"{p}: {name}: data section has gaps or overlaps (tampered file)")
        pos = end
    if pos != len(data):
        raise CheckpointError(f"{p}: {len(data) - pos} trailing bytes after the last tensor (tampered file)")
    return out, dict(meta)


def save_model(model: nn.Module, path: str | os.PathLike[str], *, config: Mapping[str, Any] | None = None) -> None:
    """Save ``model.state_dict()`` (and an optional JSON-able config) to a safetensors file.

    Raises:
        CheckpointError: On a state entry that is not a tensor or an unstorable dtype.
    """
    state = model.state_dict()
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"state_dict entries {bad} are not tensors")
    save_safetensors(state, path, metadata={"format": "hyperloom.model/1", "config": json.dumps(config or {})})


def load_model(model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_model` into ``model``; return its config.

    The file is fully validated first, so a bad file never leaves a half-loaded model.

    Raises:
        CheckpointError: Naming the file, on a bad file, or keys or shapes that do not match the model.
    """
    tensors, meta = load_safetensors(path)
    own = model.state_dict()
    if strict:
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise CheckpointError(f"{path}: keys do not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for k, v in tensors.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: {k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}")
    model.load_state_dict(tensors, strict=strict)
    return dict(json.loads(meta.get("config", "{}")))


# ------------------------------------------------------------------------------------------------
# training-run checkpoints: model, optimiser, scheduler, step, RNG states, config
# ------------------------------------------------------------------------------------------------


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    meta: dict[str, Any] = {"python": _jsonable(random.getstate())}
    if torch.cuda.is_available():  # pragma: no cover - no GPU in CI
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np = sys.modules.get("numpy")
    if np is not None:
        st = np.random.get_state()
        tensors["rng.numpy.keys"] = torch.from_numpy(st[1].astype("int64"))
        meta["numpy"] = [st[0], int(st[2]), int(st[3]), float(st[4])]
    return tensors, meta


def _jsonable(x: Any) -> Any:
    if isinstance(x, tuple):
        return {"__tuple__": [_jsonable(v) for v in x]}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x


def _unjson(x: Any) -> Any:
    if isinstance(x, dict) and "__tuple__" in x:
        return tuple(_unjson(v) for v in x["__tuple__"])
    if isinstance(x, list):
        return [_unjson(v) for v in x]
    return x


def _set_rng_state(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    random.setstate(_unjson(meta["python"]))
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():  # pragma: no cover - no GPU in CI
        torch.cuda.set_rng_state_all(cuda)
    if "numpy" in meta and "rng.numpy.keys" in tensors:
        import numpy as np

        name, pos, has_gauss, gauss = meta["numpy"]
        np.random.set_state((name, tensors["rng.numpy.keys"].numpy().astype("uint32"), pos, has_gauss, gauss))


def _split_state(prefix: str, obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Move tensors out of a nested state (optimiser, scheduler) into ``tensors``; return the JSON rest."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[_jsonable(k), _split_state(f"{prefix}.{k}", v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [_split_state(f"{prefix}.{i}", v, tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise CheckpointError(f"{prefix}: cannot checkpoint a value of type {type(obj).__name__}")


def _join_state(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {_unjson(k): _join_state(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_join_state(v, tensors) for v in obj["__tuple__"])
    if isinstance(obj, list):
        return [_join_state(v, tensors) for v in obj]
    return obj


def save_training(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    step: int,
    config: Mapping[str, Any] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
) -> None:
    """Checkpoint a training run in one safetensors file, atomically.

    Holds the model's state, the optimiser's and scheduler's state, the step, the RNG states of torch,
    numpy (when imported) and Python's ``random``, the states of any named ``torch.Generator`` the run
    draws from, and a JSON-able config.

    Raises:
        CheckpointError: On state that cannot be stored (a non-JSON value in the optimiser state, say).
    """
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in model.state_dict().items()}
    meta: dict[str, Any] = {"format": "hyperloom.training/1", "step": int(step), "config": dict(config or {})}
    if optimizer is not None:
        meta["optimizer"] = _split_state("optimizer", optimizer.state_dict(), tensors)
    if scheduler is not None:
        meta["scheduler"] = _split_state("scheduler", scheduler.state_dict(), tensors)
    rng_t, rng_m = _rng_state()
    tensors.update(rng_t)
    for name, g in (generators or {}).items():
        tensors[f"generator.{name}"] = g.get_state()
    meta["rng"] = rng_m
    save_safetensors(tensors, path, metadata={"hyperloom": json.dumps(meta)})


def load_training(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    restore_rng: bool = True,
    generators: Mapping[str, torch.Generator] | None = None,
) -> dict[str, Any]:
    """Restore a run saved by :func:`save_training`; return ``{"step": ..., "config": ...}``.

    The whole file is validated before anything is restored.

    Raises:
        CheckpointError: Naming the file, on a bad file or a model whose keys or shapes differ.
    """
    tensors, raw_meta = load_safetensors(path)
    try:
        meta = json.loads(raw_meta["hyperloom"])
        if meta.get("format") != "hyperloom.training/1":
            raise KeyError("format")
    except (KeyError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a hyperloom training checkpoint") from None
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{path}: keys do not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for k, v in state.items():
        if tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: {k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}")
    missing_gen = [n for n in (generators or {}) if f"generator.{n}" not in tensors]
    if missing_gen:
        raise CheckpointError(f"{path}: no state for generator(s) {missing_gen}")
    model.load_state_dict(state)
    if optimizer is not None and "optimizer" in meta:
        optimizer.load_state_dict(_join_state(meta["optimizer"], tensors))
    if scheduler is not None and "scheduler" in meta:
        scheduler.load_state_dict(_join_state(meta["scheduler"], tensors))
    if restore_rng:
        _set_rng_state(tensors, meta["rng"])
    for name, g in (generators or {}).items():
        g.set_state(tensors[f"generator.{name}"])
    return {"step": int(meta["step"]), "config": meta["config"]}


__all__ = [
    "CheckpointError",
    "atomic_write_bytes",
    "load_model",
    "load_safetensors",
    "load_training",
    "save_model",
    "save_safetensors",
    "save_training",
]
