"""Model and training checkpoints: safetensors files with checksums, written atomically, loaded without pickle.

The file IO (the one atomic writer, safetensors with checksums) is :mod:`hyperloom.fileio`; this
module holds the two formats on top of it:

* ``hyperloom.model/2`` (:func:`save_model` / :func:`load_model`): the ``state_dict``, a JSON-able
  config, and the whole configuration of every :class:`~hyperloom.HyperNetwork` in the model (from
  :meth:`HyperNetwork.config <hyperloom.HyperNetwork.config>`), compared field by field on load;
* ``hyperloom.training/2`` (:func:`save_training` / :func:`load_training`): the model, the optimiser
  and scheduler, the step, the RNG states and named generators, and a config.

Both must carry the checksums of their tensors and metadata; the ``/1`` files of earlier versions load
without. Loads read the file once, check the checksums and (for model and training checkpoints) the
whole metadata before touching any model, and raise :class:`CheckpointError` naming the file (and the
tensor or key) for every problem. Files written by hyperloom 0.1.0's own writer (before the package
was used) load unchanged (``tests/fixtures``).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import numbers
import os
import random
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._rng import rng_state, set_rng_state
from .errors import short_repr
from .fileio import (  # noqa: F401  (CheckpointError, the safetensors functions: importable from here as before)
    CheckpointError,
    _as_path,
    _check_storable,
    _read,
    atomic_write_bytes,
    atomic_write_files,
    load_safetensors,
    safetensors_bytes,
    save_safetensors,
)
from .hypernetwork import HyperNetwork

_MODEL_FORMATS = {"hyperloom.model/1": False, "hyperloom.model/2": True}  # format -> carries checksums
_TRAINING_FORMATS = {"hyperloom.training/1": False, "hyperloom.training/2": True}


def _require_checksums(p: Path, fmt: str, formats: Mapping[str, bool], unchecked: list[str]) -> None:
    if formats[fmt] and unchecked:
        raise CheckpointError(
            f"{p}: the file claims format {fmt!r}, which carries checksums, but it has none for its "
            f"{' and '.join(unchecked)} (tampered or corrupt file)"
        )


def _hypernetworks(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The whole configuration (:meth:`HyperNetwork.config <hyperloom.HyperNetwork.config>`) of every hypernetwork.

    A LoRA model's options (rank, alpha, dropout, bias, shared_A, targets) go under its hypernetwork's ``lora``.
    """
    from .lora import LoRAModel  # lora imports this module's importers

    out = {name: module.config() for name, module in model.named_modules() if isinstance(module, HyperNetwork)}
    for name, module in model.named_modules():
        if isinstance(module, LoRAModel):
            key = f"{name}.hypernet" if name else "hypernet"
            if key in out:
                out[key] = {**out[key], "lora": module.lora.to_json(module.targets)}
    return out


#: Recorded LoRA options not compared: whether the base is frozen changes no tensor.
_LORA_UNCHECKED = ("lora.freeze_base",)


def _unchecked(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in (*HyperNetwork.CONFIG_UNCHECKED, *_LORA_UNCHECKED))


def _config_diff(saved: Any, own: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """The first field (dotted) where a recorded configuration differs from the model's, or ``None``.

    Fields the record lacks (written by an earlier version) are not compared; a field the model lacks
    matches only a recorded ``None`` (how earlier versions recorded absent fields).
    """
    if _unchecked(key):
        return None
    if isinstance(saved, dict) and isinstance(own, dict):
        for k, v in saved.items():
            sub = f"{key}.{k}" if key else str(k)
            if k not in own:
                if v is not None and not _unchecked(sub):
                    return sub, v, "(none)"
                continue
            diff = _config_diff(v, own[k], sub)
            if diff is not None:
                return diff
        return None
    if type(saved) is not type(own) and not (isinstance(saved, int | float) and isinstance(own, int | float)):
        return key, saved, own
    return None if saved == own else (key, saved, own)


def _check_hypernetworks(path: str | os.PathLike[str], saved: Any, model: nn.Module, *, strict: bool, targets: bool = False) -> None:
    """Compare the configurations saved with the checkpoint (``None``: an older file) with the model's, field by field.

    ``targets``: compare the targets' shapes only (after the state's keys and shapes, which name the tensors
    more precisely), else everything but them.
    """
    if saved is None:
        return
    if not isinstance(saved, dict) or not all(isinstance(v, dict) and isinstance(v.get("inputs"), dict) for v in saved.values()):
        raise CheckpointError(f"{path}: corrupt hypernetwork declarations in the checkpoint")
    own = _hypernetworks(model)
    if strict and sorted(saved) != sorted(own):
        raise CheckpointError(f"{path}: hypernetwork modules: saved {sorted(saved)}, model {sorted(own)}")
    for name in [n for n in saved if n in own]:
        if targets:
            if "targets" not in saved[name]:  # written before the whole configuration was recorded
                continue
            diff = _config_diff({"targets": saved[name]["targets"]}, {"targets": own[name]["targets"]})
            if diff is not None:
                raise CheckpointError(f"{path}: hypernetwork {name!r} {diff[0]}: saved {diff[1]!r}, model {diff[2]!r}")
            continue
        s_inputs, m_inputs = saved[name]["inputs"], own[name]["inputs"]
        if list(s_inputs) != list(m_inputs):
            raise CheckpointError(f"{path}: hypernetwork {name!r}: input names: saved {list(s_inputs)}, model {list(m_inputs)}")
        for inp, fields in s_inputs.items():
            if not isinstance(fields, dict):
                raise CheckpointError(f"{path}: corrupt hypernetwork declarations in the checkpoint (input {inp!r})")
            diff = _config_diff(fields, m_inputs[inp], f"inputs.{inp}")
            if diff is not None:
                field = diff[0].split(".", 2)[2]
                raise CheckpointError(f"{path}: hypernetwork {name!r}: input {inp!r} {field}: saved {diff[1]!r}, model {diff[2]!r}")
        diff = _config_diff({k: v for k, v in saved[name].items() if k not in ("inputs", "targets")}, own[name])
        if diff is not None:
            raise CheckpointError(f"{path}: hypernetwork {name!r} {diff[0]}: saved {diff[1]!r}, model {diff[2]!r}")


def _load_json(path: str | os.PathLike[str], meta: Mapping[str, str], key: str) -> Any:
    if key not in meta:
        return None
    try:
        return json.loads(meta[key])
    except (json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{path}: corrupt checkpoint metadata {key!r} (not JSON)") from None


def _config_json(path: str | os.PathLike[str], config: Any) -> dict[str, Any]:
    """``config`` as a plain dict, checked to be JSON-serialisable (a :class:`CheckpointError` naming ``path`` if not)."""
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise CheckpointError(f"{path}: config must be a mapping, got {type(config).__name__}")
    out = dict(config)
    try:
        json.dumps(out)
    except (TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: config is not JSON-serialisable ({e})") from None
    return out


def _check_state(path: str | os.PathLike[str], state: Mapping[str, torch.Tensor], own: Mapping[str, Any], *, strict: bool) -> None:
    if strict:
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise CheckpointError(f"{path}: keys do not match the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    elif state and own and not set(state) & set(own):  # strict=False loads the keys in common: here, nothing at all
        raise CheckpointError(
            f"{path}: no key of the checkpoint is in the model (strict=False would load nothing): checkpoint "
            f"{sorted(state)[:4]}..., model {sorted(own)[:4]}... (another model, or a prefix to strip?)"
        )
    for k, v in state.items():
        if k in own and isinstance(own[k], torch.Tensor) and tuple(own[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{path}: {k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}")
    for k, v in state.items():
        if k in own and isinstance(own[k], torch.Tensor):
            _check_cast(path, k, v, own[k].dtype)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a float32 copy for the one-byte float dtypes that ``torch.isfinite`` does not take."""
    return t.float() if t.is_floating_point() and t.element_size() == 1 else t


def _check_cast(path: str | os.PathLike[str], label: str, v: torch.Tensor, dtype: torch.dtype) -> None:
    """Raise if finite values of ``v`` would become infinite or NaN when cast to ``dtype`` (a narrower model)."""
    floating = v.is_floating_point() or v.is_complex()
    if v.dtype == dtype or not floating or not (dtype.is_floating_point or dtype.is_complex) or (v.is_complex() and not dtype.is_complex):
        return
    src = _wide(v)
    bad = torch.isfinite(src) & ~torch.isfinite(_wide(v.to(dtype)))
    if bool(bad.any()):
        worst = float(src[bad].abs().max())
        raise CheckpointError(
            f"{path}: {label}: finite values overflow when cast to the model's dtype: checkpoint {v.dtype} with magnitudes up to "
            f"{worst:g}, model {dtype} whose largest finite value is {torch.finfo(dtype).max:g}"
        )


def _cpu_copy(state: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a module's state on the CPU (the model's own memory is left for the model)."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            out[k] = v if v.is_meta else v.detach().to("cpu", copy=True)  # a meta tensor has no data to lose
        else:
            out[k] = copy.deepcopy(v)
    return out


def save_model(model: nn.Module, path: str | os.PathLike[str], *, config: Mapping[str, Any] | None = None) -> None:
    """Save ``model.state_dict()`` (and an optional JSON-able config) to a safetensors file.

    The input declarations (and formulation, encoding, additivity) of every
    :class:`~hyperloom.HyperNetwork` in the model are stored with it and checked by :func:`load_model`.
    The file (format ``hyperloom.model/2``) carries checksums of its tensors and metadata.

    Raises:
        CheckpointError: Naming the file, before anything is written, on a state entry that is not a
            tensor or cannot be stored (meta device, sparse, an unstorable dtype), a config that is not
            JSON-serialisable, or a path that cannot be written.
    """
    target = _as_path(path)
    atomic_write_bytes(target, [model_bytes(model, target, config=config)])


def model_bytes(model: nn.Module, path: str | os.PathLike[str], *, config: Mapping[str, Any] | None = None) -> bytes:
    """The bytes :func:`save_model` writes, for :func:`~hyperloom.fileio.atomic_write_files` (``path``: for messages).

    Raises:
        CheckpointError: As :func:`save_model`, but nothing is written.
    """
    target = _as_path(path)
    state = model.state_dict()
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{target}: state_dict entries {bad} are not tensors")
    meta = {
        "format": "hyperloom.model/2",
        "config": json.dumps(_config_json(target, config)),
        "hypernetworks": json.dumps(_hypernetworks(model)),
    }
    return safetensors_bytes(state, target, metadata=meta)


def load_model(model: nn.Module, path: str | os.PathLike[str], *, strict: bool = True) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_model` into ``model``; return its config.

    The file is fully validated first, so a bad file never leaves a half-loaded model (should the
    load fail inside torch all the same, the model's state is rolled back).

    Raises:
        CheckpointError: Naming the file, on a bad file (a file claiming the format ``hyperloom.model/2``
            must carry checksums), keys or shapes that do not match the model, finite values that overflow
            in the model's narrower dtype (naming the tensor), or hypernetwork input declarations (name,
            range, scale, dim, out_of_range) or formulation that differ from the model's (files written
            before these were recorded skip that check).
    """
    p = _as_path(path)
    tensors, meta, unchecked = _read(p)
    fmt = meta.get("format")
    if fmt is not None and fmt.startswith("hyperloom."):  # other tools' files ("pt", none) load as they are
        if fmt not in _MODEL_FORMATS:
            hint = "; load it with load_training" if fmt.startswith("hyperloom.training/") else " (written by a newer hyperloom?)"
            raise CheckpointError(f"{p}: not a hyperloom model checkpoint: format {fmt!r}, expected one of {sorted(_MODEL_FORMATS)}{hint}")
        _require_checksums(p, fmt, _MODEL_FORMATS, unchecked)
    config = _load_json(p, meta, "config")
    if not isinstance(config, dict | None):
        raise CheckpointError(f"{p}: corrupt checkpoint metadata 'config': a JSON object expected, got {short_repr(config)}")
    record = _load_json(p, meta, "hypernetworks")
    _check_hypernetworks(p, record, model, strict=strict)
    _check_state(p, tensors, model.state_dict(), strict=strict)
    _check_hypernetworks(p, record, model, strict=strict, targets=True)
    before = _cpu_copy(model.state_dict())
    try:
        model.load_state_dict(tensors, strict=strict)
    except Exception as e:
        try:
            model.load_state_dict(before)
        except Exception as e2:  # pragma: no cover - the state was just read from this very model
            raise CheckpointError(
                f"{p}: the checkpoint could not be loaded ({type(e).__name__}: {e}); rolling back failed too ({e2})"
            ) from e
        raise CheckpointError(f"{p}: the checkpoint could not be loaded ({type(e).__name__}: {e}); the model was left as it was") from e
    return dict(config or {})


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


def _parse_rng_state(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Validate the stored RNG states (on throw-away generators) without touching the global ones."""
    corrupt = f"{path}: corrupt training checkpoint:"
    rng = meta.get("rng")
    if not isinstance(rng, dict) or "python" not in rng:
        raise CheckpointError(f"{corrupt} no RNG state")
    if "rng.torch" not in tensors:
        raise CheckpointError(f"{corrupt} no tensor 'rng.torch'")
    out: dict[str, Any] = {"torch": tensors["rng.torch"]}
    try:  # anything goes wrong on malformed state: it is tried on a throw-away generator
        out["python"] = _unjson(rng["python"])
        random.Random().setstate(out["python"])
    except Exception:
        raise CheckpointError(f"{corrupt} invalid Python RNG state") from None
    try:
        torch.Generator().set_state(out["torch"])
    except (RuntimeError, TypeError):
        raise CheckpointError(f"{corrupt} invalid torch RNG state {tuple(out['torch'].shape)} of {out['torch'].dtype}") from None
    out["cuda"] = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if "numpy" in rng and "rng.numpy.keys" in tensors:
        try:
            import numpy as np
        except ImportError:  # pragma: no cover - numpy was imported when saved; nothing draws from it now
            return out
        try:
            name, pos, has_gauss, gauss = rng["numpy"]
            state = (name, tensors["rng.numpy.keys"].numpy().astype("uint32"), pos, has_gauss, gauss)
            np.random.RandomState().set_state(state)
        except Exception:
            raise CheckpointError(f"{corrupt} invalid numpy RNG state") from None
        out["numpy"] = state
    return out


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


def _join(path: str | os.PathLike[str], obj: Any, tensors: Mapping[str, torch.Tensor], what: str) -> dict[Any, Any]:
    try:
        out = _join_state(obj, tensors)
    except KeyError as e:
        raise CheckpointError(f"{path}: corrupt training checkpoint: {what} state refers to a missing tensor {e}") from None
    except Exception:  # TypeError, ValueError, IndexError, RecursionError...: the JSON is not what _split_state writes
        raise CheckpointError(f"{path}: corrupt training checkpoint: malformed {what} state") from None
    if not isinstance(out, dict):
        raise CheckpointError(f"{path}: corrupt training checkpoint: {what} state is not a mapping")
    return out


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _shape(x: Any) -> tuple[int, ...] | None:
    try:
        return tuple(int(d) for d in x)
    except (TypeError, ValueError, OverflowError):
        return None


def _check_optimizer(
    path: str | os.PathLike[str], meta: Mapping[str, Any], state: Mapping[Any, Any], optimizer: torch.optim.Optimizer, model: nn.Module
) -> None:
    """Check a stored optimiser state fits ``optimizer`` (class, groups, parameter shapes, state keys)."""
    given = _qualname(type(optimizer))
    saved_cls = meta.get("optimizer_class")
    if saved_cls is not None and saved_cls != given:
        raise CheckpointError(f"{path}: optimiser class: checkpoint {saved_cls}, given {given}")
    groups, per_param = state.get("param_groups"), state.get("state")
    if not isinstance(groups, list) or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        raise CheckpointError(f"{path}: corrupt training checkpoint: malformed optimiser parameter groups")
    if not isinstance(per_param, dict) or not all(isinstance(v, dict) for v in per_param.values()):
        raise CheckpointError(f"{path}: corrupt training checkpoint: malformed optimiser state")
    own = optimizer.param_groups
    if len(groups) != len(own):
        raise CheckpointError(f"{path}: optimiser has {len(groups)} parameter group(s) in the checkpoint, {len(own)} in the optimiser")
    for i, (g, og) in enumerate(zip(groups, own, strict=True)):
        n_saved, n_own = len(g["params"]), len(og["params"])
        if n_saved != n_own:
            raise CheckpointError(
                f"{path}: optimiser parameter group {i} holds {n_saved} parameters in the checkpoint, {n_own} in the optimiser"
            )
        extra = sorted(set(g) - set(og), key=str)
        if saved_cls is None and extra:  # older files do not record the class: unknown hyperparameters betray another one
            raise CheckpointError(
                f"{path}: optimiser parameter group {i} has hyperparameters {extra} in the checkpoint that {given} does not take "
                "(saved from another optimiser class?)"
            )
    ids = {pid for g in groups for pid in g["params"] if isinstance(pid, int | str)}
    stray = sorted((k for k in per_param if k not in ids), key=str)
    if stray:
        raise CheckpointError(f"{path}: corrupt training checkpoint: optimiser state for parameter(s) {stray[:8]} that no group holds")
    shapes = meta.get("optimizer_shapes")
    if shapes is None:
        return
    names = {id(p): n for n, p in model.named_parameters()}
    flat = [p for og in own for p in og["params"]]
    saved_shapes = [_shape(s) for g in shapes for s in g] if isinstance(shapes, list) and all(isinstance(g, list) for g in shapes) else None
    if saved_shapes is None or len(saved_shapes) != len(flat):
        raise CheckpointError(f"{path}: corrupt training checkpoint: malformed optimiser parameter shapes")
    k = 0
    for i, og in enumerate(own):
        for p in og["params"]:
            if saved_shapes[k] != tuple(p.shape):
                label = f"group {i}, {names[id(p)]}" if id(p) in names else f"group {i}"
                raise CheckpointError(
                    f"{path}: optimiser parameter {k} ({label}): checkpoint shape {saved_shapes[k]}, optimiser {tuple(p.shape)}"
                )
            k += 1


def _non_finite_state(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> tuple[list[str], dict[str, list[str]]]:
    """Names of the model's non-finite parameters, and of the parameters with non-finite optimiser state.

    Returns:
        ``(parameters, state)``: parameter names whose values hold a NaN or an infinity, and a mapping
        ``parameter name -> [state keys]`` (``exp_avg_sq``, ``momentum_buffer``...) for the optimiser's state.
        Both are empty for a healthy run. Buffers are not checked (an attention mask may hold ``-inf``).
    """
    params = [(n, p) for n, p in model.named_parameters() if p.is_floating_point() or p.is_complex()]
    state: list[tuple[str, str, torch.Tensor]] = []
    if optimizer is not None:
        names = {id(p): n for n, p in model.named_parameters()}
        flat = [p for g in optimizer.param_groups for p in g["params"]]
        for k, p in enumerate(flat):
            for key, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()):
                    state.append((names.get(id(p), f"optimiser parameter {k}"), str(key), v))
    if _all_finite([p for _, p in params] + [v for _, _, v in state]):
        return [], {}
    bad_state: dict[str, list[str]] = {}
    for name, key, v in state:
        if not bool(torch.isfinite(v).all()):
            bad_state.setdefault(name, []).append(key)
    return [n for n, p in params if not bool(torch.isfinite(p).all())], bad_state


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor is free of NaN and infinities (one device synchronisation per device)."""
    flags: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        if t.numel():
            flags.setdefault(t.device, []).append(torch.isfinite(t.detach()).all())
    return all(bool(torch.stack(f).all()) for f in flags.values())


def _scheduler_structure(scheduler: Any) -> list[Any] | None:
    """The classes of a composite scheduler's parts (``ChainedScheduler``, ``SequentialLR``), nested; ``None`` for others."""
    parts = getattr(scheduler, "_schedulers", None)
    if not isinstance(parts, list | tuple):
        return None
    out: list[Any] = []
    for s in parts:
        inner = _scheduler_structure(s)
        out.append(_qualname(type(s)) if inner is None else [_qualname(type(s)), inner])
    return out


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

    Holds the model's state, the optimiser's and scheduler's state (and their classes), the step, the RNG
    states of torch, numpy (when imported) and Python's ``random``, the states of any named
    ``torch.Generator`` the run draws from, the hypernetworks' input declarations and a JSON-able config.
    The file (format ``hyperloom.training/2``) carries checksums of its tensors and metadata.

    Raises:
        CheckpointError: Before writing anything (a file already there is kept), on non-finite model
            parameters or optimiser state (naming them), state that cannot be stored (a non-JSON value
            in the optimiser state, a tensor on the meta device, say), a config that is not
            JSON-serialisable, a step that is not an integer or a path that cannot be written.
    """
    target = _as_path(path)
    if not isinstance(step, numbers.Integral) or isinstance(step, bool):
        raise CheckpointError(f"{target}: step must be an int, got {type(step).__name__} {short_repr(step)}")
    config = _config_json(target, config)
    state = model.state_dict()
    for k, v in state.items():
        _check_storable(target, k, v)
    for name, g in (generators or {}).items():
        if not isinstance(g, torch.Generator):
            raise CheckpointError(f"{target}: generator {name!r}: expected a torch.Generator, got {type(g).__name__}")
    bad, bad_state = _non_finite_state(model, optimizer)
    if bad:
        raise CheckpointError(f"{target}: refusing to checkpoint non-finite parameters {bad}")
    if bad_state:
        raise CheckpointError(f"{target}: refusing to checkpoint non-finite optimiser state {bad_state}")
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in state.items()}
    meta: dict[str, Any] = {"format": "hyperloom.training/2", "step": int(step), "config": config}
    meta["hypernetworks"] = _hypernetworks(model)
    if optimizer is not None:
        meta["optimizer"] = _split_state("optimizer", optimizer.state_dict(), tensors)
        meta["optimizer_class"] = _qualname(type(optimizer))
        meta["optimizer_shapes"] = [[list(p.shape) for p in g["params"]] for g in optimizer.param_groups]
    if scheduler is not None:
        meta["scheduler"] = _split_state("scheduler", scheduler.state_dict(), tensors)
        meta["scheduler_class"] = _qualname(type(scheduler))
        structure = _scheduler_structure(scheduler)
        if structure is not None:
            meta["scheduler_structure"] = structure
    rng_t, rng_m = _rng_state()
    tensors.update(rng_t)
    for name, g in (generators or {}).items():
        tensors[f"generator.{name}"] = g.get_state()
    meta["rng"] = rng_m
    save_safetensors(tensors, target, metadata={"hyperloom": json.dumps(meta)})


def _check_optimizer_dtypes(path: Path, state: Mapping[Any, Any], optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Raise if the optimiser state (validated by :func:`_check_optimizer`) overflows in its parameters' dtypes."""
    names = {id(p): n for n, p in model.named_parameters()}
    params: dict[Any, tuple[str, torch.Tensor]] = {}
    k = 0
    for g, og in zip(state["param_groups"], optimizer.param_groups, strict=True):
        for pid, p in zip(g["params"], og["params"], strict=True):
            if isinstance(pid, int | str):
                params[pid] = (names.get(id(p), f"optimiser parameter {k}"), p)
            k += 1
    for pid, per_param in state["state"].items():
        if pid not in params:
            continue
        name, p = params[pid]
        for key, v in per_param.items():
            # torch casts all but "step" to a floating parameter's dtype
            if key != "step" and isinstance(v, torch.Tensor) and p.is_floating_point():
                _check_cast(path, f"optimiser state {key!r} of {name}", v, p.dtype)


def _snapshot(
    model: nn.Module, optimizer: torch.optim.Optimizer | None, scheduler: Any | None, generators: Mapping[str, torch.Generator], rng: bool
) -> dict[str, Any]:
    """What :func:`load_training` may change, to roll back a restore that fails half-way."""
    snap: dict[str, Any] = {"model": _cpu_copy(model.state_dict()), "generators": {k: g.get_state() for k, g in generators.items()}}
    if optimizer is not None:
        # load_state_dict replaces the state tensors rather than writing into them: references will do
        sd = optimizer.state_dict()
        snap["optimizer"] = {"state": {k: dict(v) for k, v in sd["state"].items()}, "param_groups": copy.deepcopy(sd["param_groups"])}
    if scheduler is not None:
        sd = scheduler.state_dict()
        try:
            snap["scheduler"] = copy.deepcopy(sd)
        except Exception:  # pragma: no cover - a scheduler whose state does not deep-copy: its load replaces attributes anyway
            snap["scheduler"] = dict(sd)
    if rng:
        snap["rng"] = rng_state()
    return snap


def _roll_back(
    snap: Mapping[str, Any],
    done: list[str],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    generators: Mapping[str, torch.Generator],
) -> list[str]:
    """Undo the restores in ``done`` (in reverse order); return what could not be undone."""
    failed = []
    for what in reversed(done):
        try:
            if what == "optimizer" and optimizer is not None:
                optimizer.load_state_dict(snap["optimizer"])
            elif what == "scheduler" and scheduler is not None:
                scheduler.load_state_dict(snap["scheduler"])
            elif what == "model":
                model.load_state_dict(snap["model"])
            elif what == "rng":
                set_rng_state(snap["rng"])
            elif what == "generators":
                for name, g in generators.items():
                    g.set_state(snap["generators"][name])
        except Exception as e:  # pragma: no cover - the snapshot was just taken from these very objects
            failed.append(f"{what}: {type(e).__name__}: {e}")
    return failed


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

    The whole file is validated before anything is restored, and a restore that fails all the same
    (inside torch, say) is rolled back: a failed load leaves the model, the optimiser, the scheduler,
    the generators and the RNG states as they were.

    Raises:
        CheckpointError: Naming the file, on a bad file or header (a file claiming the format
            ``hyperloom.training/2`` must carry checksums); a model whose keys, shapes or hypernetwork
            input declarations differ; finite values (parameters, optimiser state) that overflow in the
            model's narrower dtype; an optimiser of another class or over other parameters (groups, counts,
            shapes); a scheduler of another class or structure; an optimiser or scheduler given for a
            checkpoint that holds none; RNG or generator states that do not fit; or any failure of the
            restore itself (chained).
    """
    p = _as_path(path)
    tensors, raw_meta, unchecked = _read(p)
    try:
        meta = json.loads(raw_meta["hyperloom"])
        if not isinstance(meta, dict) or not isinstance(meta.get("format"), str) or meta["format"] not in _TRAINING_FORMATS:
            raise KeyError("format")
    except (KeyError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{p}: not a hyperloom training checkpoint") from None
    _require_checksums(p, meta["format"], _TRAINING_FORMATS, unchecked)
    corrupt = f"{p}: corrupt training checkpoint:"
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        raise CheckpointError(f"{corrupt} 'step' must be an integer, got {short_repr(step)}")
    config = meta.get("config", {})
    if not isinstance(config, dict):
        raise CheckpointError(f"{corrupt} 'config' must be a JSON object, got {short_repr(config)}")
    generators = dict(generators or {})
    for name, g in generators.items():
        if not isinstance(g, torch.Generator):
            raise CheckpointError(f"{p}: generator {name!r}: expected a torch.Generator, got {type(g).__name__}")
    _check_hypernetworks(p, meta.get("hypernetworks"), model, strict=True)
    state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    _check_state(p, state, model.state_dict(), strict=True)
    _check_hypernetworks(p, meta.get("hypernetworks"), model, strict=True, targets=True)
    opt_state = sched_state = None
    if optimizer is not None:
        if "optimizer" not in meta:
            raise CheckpointError(f"{p}: holds no optimiser state, but an optimiser was given")
        opt_state = _join(p, meta["optimizer"], tensors, "optimiser")
        _check_optimizer(p, meta, opt_state, optimizer, model)
        _check_optimizer_dtypes(p, opt_state, optimizer, model)
    if scheduler is not None:
        if "scheduler" not in meta:
            raise CheckpointError(f"{p}: holds no scheduler state, but a scheduler was given")
        saved_cls, given = meta.get("scheduler_class"), _qualname(type(scheduler))
        if saved_cls is not None and saved_cls != given:
            raise CheckpointError(f"{p}: scheduler class: checkpoint {saved_cls}, given {given}")
        if "scheduler_structure" in meta:  # files written before it was recorded rely on the roll-back below
            saved_structure, own_structure = meta["scheduler_structure"], _scheduler_structure(scheduler)
            if not isinstance(saved_structure, list):
                raise CheckpointError(f"{corrupt} malformed scheduler structure {short_repr(saved_structure)}")
            if saved_structure != own_structure:
                raise CheckpointError(f"{p}: scheduler structure: checkpoint {saved_structure}, given {own_structure}")
        sched_state = _join(p, meta["scheduler"], tensors, "scheduler")
    rng = _parse_rng_state(p, tensors, meta) if restore_rng else None
    for name, g in generators.items():
        t = tensors.get(f"generator.{name}")
        if t is None:
            raise CheckpointError(
                f"{p}: no state for generator {name!r}; stored: {sorted(k[10:] for k in tensors if k.startswith('generator.'))}"
            )
        own = g.get_state()
        if t.dtype != own.dtype or t.shape != own.shape:
            raise CheckpointError(
                f"{p}: generator {name!r}: checkpoint state {tuple(t.shape)} of {t.dtype}, generator {tuple(own.shape)} of {own.dtype}"
            )
    # everything is validated: restore, rolling everything back should torch refuse part of it all the same
    snap = _snapshot(model, optimizer, scheduler, generators, rng is not None)
    done: list[str] = []
    try:
        if optimizer is not None and opt_state is not None:
            done.append("optimizer")
            optimizer.load_state_dict(opt_state)
        if scheduler is not None and sched_state is not None:
            done.append("scheduler")
            scheduler.load_state_dict(sched_state)
        done.append("model")
        model.load_state_dict(state)
        if rng is not None:
            done.append("rng")
            set_rng_state(rng)
        done.append("generators")
        for name, g in generators.items():
            g.set_state(tensors[f"generator.{name}"])
    except BaseException as e:
        failed = _roll_back(snap, done, model, optimizer, scheduler, generators)
        if not isinstance(e, Exception):
            raise
        kept = (
            "the model, optimiser, scheduler, generators and RNG states were left as they were"
            if not failed
            else f"rolling back failed for {failed}"
        )
        raise CheckpointError(f"{p}: the checkpoint could not be restored ({type(e).__name__}: {e}); {kept}") from e
    return {"step": step, "config": config}


__all__ = ["load_model", "load_training", "save_model", "save_training"]
