"""Reading a LoRA directory's config: checked against its checksummed copy, then validated field by field.

:meth:`LoRAModel.save_pretrained <hyperloom.LoRAModel.save_pretrained>` writes the config twice: as the
human-readable ``hyperloom_lora.json`` and, checksummed, in the metadata of the weights file. The JSON has
no checksum of its own, so :func:`read_config` trusts only what matches the checksummed copy (an edited
``alpha`` is refused by field name), then validates the type and range of every field before anything is
built, so a malformed file is a :class:`~hyperloom.CheckpointError` naming the field, never a raw
``TypeError`` / ``AttributeError`` / ``OverflowError`` from deep inside.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .encoding import ENCODINGS
from .errors import HyperloomError, short_repr
from .fileio import CheckpointError, load_safetensors
from .heads import HEADS
from .hypernetwork import FORMULATIONS
from .inputs import Input
from .shared_heads import head_spec
from .task import Task
from .trunk import ACTIVATIONS, INITS, NORMS

#: Largest width, input dim or rank a config may declare, and deepest trunk: far beyond any real adapter's
#: hypernetwork, and small enough that no allocation overflows before the weights are checked.
MAX_WIDTH = 1 << 16
MAX_DEPTH = 64
#: Largest product of two consecutive trunk widths (one layer's weights): 2**28 numbers, 1 GiB in float32.
MAX_LAYER = 1 << 28

_LORA_KEYS = ("rank", "alpha", "dropout", "shared_A", "bias", "targets", "freeze_base")
_TOP_KEYS = ("format", "lora", "inputs", "hypernetwork", "batch_dim", "base_class", "include_base")
_INPUT_KEYS = tuple(f.name for f in fields(Input))
_TASK_KEYS = ("kind", *(f.name for f in fields(Task)))
#: Most task ids a config may declare (rows of the embedding table).
MAX_TASKS = 1 << 24


@dataclass
class LoRAConfig:
    """A validated LoRA directory config: the arguments of :class:`~hyperloom.LoRAModel`."""

    raw: dict[str, Any]
    lora: dict[str, Any]
    targets: list[str]
    inputs: dict[str, Input | Task]
    hyper: dict[str, Any]
    batch_dim: int
    include_base: bool


def _first_difference(a: Any, b: Any, key: str = "") -> tuple[str, Any, Any] | None:
    """The first dotted field where two JSON values differ (``(field, a, b)``), or ``None``."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            sub = f"{key}.{k}" if key else str(k)
            if k not in a or k not in b:
                return sub, a.get(k, "(absent)"), b.get(k, "(absent)")
            d = _first_difference(a[k], b[k], sub)
            if d is not None:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = _first_difference(x, y, f"{key}[{i}]")
            if d is not None:
                return d
        return None
    same = type(a) is type(b) and (a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)))
    return None if same else (key, a, b)


def _int(where: Path, field: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise CheckpointError(f"{where}: {field} must be an integer, got {short_repr(v)}")
    if not lo <= v <= hi:
        raise CheckpointError(f"{where}: {field} must be in [{lo}, {hi}], got {short_repr(v)}")
    return v


def _bool(where: Path, field: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise CheckpointError(f"{where}: {field} must be true or false, got {short_repr(v)}")
    return v


def _choice(where: Path, field: str, v: Any, options: Any, *, optional: bool = False) -> Any:
    if v is None and optional:
        return None
    if not isinstance(v, str) or v not in options:
        raise CheckpointError(f"{where}: {field} must be one of {sorted(options)}{' or null' if optional else ''}, got {short_repr(v)}")
    return v


def _object(where: Path, field: str, v: Any, keys: tuple[str, ...] | None, *, required: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise CheckpointError(f"{where}: {field} must be a JSON object, got {short_repr(v)}")
    if keys is not None:
        unknown = [k for k in v if k not in keys]
        if unknown:
            raise CheckpointError(f"{where}: {field}: unknown field(s) {unknown}; valid fields are {list(keys)}")
    missing = [k for k in required if k not in v]
    if missing:
        raise CheckpointError(f"{where}: {field}: missing field(s) {missing}")
    return v


def _number(where: Path, field: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(float(v)):
        raise CheckpointError(f"{where}: {field} must be a finite number, got {short_repr(v)}")
    return float(v)


def validate(where: Path, cfg: Any, fmt: str, hyper_keys: tuple[str, ...]) -> LoRAConfig:
    """Check every field of a LoRA config; return the arguments of :class:`~hyperloom.LoRAModel`.

    Raises:
        CheckpointError: Naming ``where`` and the field, on a missing or unknown field, a value of the wrong
            type, or one out of range (widths, dims and ranks above :data:`MAX_WIDTH`, trunks deeper than
            :data:`MAX_DEPTH`, a layer of more than :data:`MAX_LAYER` weights).
    """
    top = _object(where, "config", cfg, _TOP_KEYS, required=_TOP_KEYS)
    if top["format"] != fmt:
        raise CheckpointError(f"{where}: format {short_repr(top['format'])}, expected {fmt!r}")
    lo = _object(where, "lora", top["lora"], _LORA_KEYS, required=_LORA_KEYS)
    _int(where, "lora.rank", lo["rank"], 1, MAX_WIDTH)
    _number(where, "lora.alpha", lo["alpha"])
    _number(where, "lora.dropout", lo["dropout"])
    for flag in ("shared_A", "bias", "freeze_base"):
        _bool(where, f"lora.{flag}", lo[flag])
    targets = lo["targets"]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        raise CheckpointError(f"{where}: lora.targets must be a non-empty list of module names, got {short_repr(targets)}")
    inputs_raw = _object(where, "inputs", top["inputs"], None)
    if not inputs_raw:
        raise CheckpointError(f"{where}: inputs must declare at least one input, got {{}}")
    inputs: dict[str, Input | Task] = {}
    width = 0
    for name, spec in inputs_raw.items():
        field = f"inputs.{name}"
        if isinstance(spec, dict) and spec.get("kind") == "Task":
            spec = _object(where, field, spec, _TASK_KEYS, required=("num_tasks",))
            n = _int(where, f"{field}.num_tasks", spec["num_tasks"], 1, MAX_TASKS)
            if "dim" in spec:
                _int(where, f"{field}.dim", spec["dim"], 1, MAX_WIDTH)
            if spec.get("max_tasks") is not None:
                _int(where, f"{field}.max_tasks", spec["max_tasks"], n, MAX_TASKS)
            if "norm" in spec and spec["norm"] is not None:
                _choice(where, f"{field}.norm", spec["norm"], ("unit",), optional=True)
            try:
                task = Task(**{k: v for k, v in spec.items() if k != "kind"})
            except HyperloomError as e:
                raise CheckpointError(f"{where}: {field}: {e}") from None
            inputs[name] = task
            width += task.dim
            continue
        spec = _object(where, field, spec, _INPUT_KEYS, required=("low", "high"))
        if "dim" in spec:
            _int(where, f"{field}.dim", spec["dim"], 1, MAX_WIDTH)
        try:
            inp = Input(**spec)
        except HyperloomError as e:
            raise CheckpointError(f"{where}: {field}: {e}") from None
        inputs[name] = inp
        width += 2 * inp.dim  # the widest encoding (cos|sin) doubles the coordinates
    hy = _object(where, "hypernetwork", top["hypernetwork"], hyper_keys)
    if "hidden" in hy:
        hidden = hy["hidden"]
        if not isinstance(hidden, list) or len(hidden) > MAX_DEPTH:
            raise CheckpointError(f"{where}: hypernetwork.hidden must be a list of at most {MAX_DEPTH} widths, got {short_repr(hidden)}")
        for i, w in enumerate(hidden):
            _int(where, f"hypernetwork.hidden[{i}]", w, 1, MAX_WIDTH)
        for a, b in zip([width, *hidden], hidden, strict=False):
            if a * b > MAX_LAYER:
                raise CheckpointError(f"{where}: hypernetwork.hidden: a layer of {a} x {b} weights exceeds {MAX_LAYER}")
        hy["hidden"] = tuple(hidden)
    checks: dict[str, Any] = {
        "activation": ACTIVATIONS,
        "norm": NORMS,
        "formulation": FORMULATIONS,
        "init": INITS,
    }
    for key, options in checks.items():
        if key in hy:
            _choice(where, f"hypernetwork.{key}", hy[key], options)
    if "head" in hy:
        if isinstance(hy["head"], str):
            _choice(where, "hypernetwork.head", hy["head"], (*HEADS, "chunked", "structured"))
        elif isinstance(hy["head"], dict):
            try:
                head_spec(hy["head"])  # a shared head's options: kind and every field's type
            except HyperloomError as e:
                raise CheckpointError(f"{where}: hypernetwork.head: {e}") from None
            for k in ("chunk_size", "block"):  # sizes that allocate: bounded like the widths
                if hy["head"].get(k) is not None:
                    _int(where, f"hypernetwork.head.{k}", hy["head"][k], 1, MAX_LAYER)
            for k in ("dim", "width"):
                if k in hy["head"]:
                    _int(where, f"hypernetwork.head.{k}", hy["head"][k], 1, MAX_WIDTH)
        else:
            got = short_repr(hy["head"])
            raise CheckpointError(f"{where}: hypernetwork.head must be a head name or a shared head's options, got {got}")
    if "encoding" in hy:
        _choice(where, "hypernetwork.encoding", hy["encoding"], ENCODINGS, optional=True)
    if "additive" in hy and hy["additive"] is not None:
        _bool(where, "hypernetwork.additive", hy["additive"])
    if "zero_init" in hy:
        _bool(where, "hypernetwork.zero_init", hy["zero_init"])
    if "rank" in hy and hy["rank"] is not None:
        _int(where, "hypernetwork.rank", hy["rank"], 1, MAX_WIDTH)
    batch_dim = _int(where, "batch_dim", top["batch_dim"], -MAX_DEPTH, MAX_DEPTH)
    if not isinstance(top["base_class"], str):
        raise CheckpointError(f"{where}: base_class must be a string, got {short_repr(top['base_class'])}")
    include_base = _bool(where, "include_base", top["include_base"])
    return LoRAConfig(
        raw=top, lora=dict(lo), targets=list(targets), inputs=inputs, hyper=dict(hy), batch_dim=batch_dim, include_base=include_base
    )


def read_config(src: Path, config_name: str, weights_name: str, fmt: str, hyper_keys: tuple[str, ...]) -> LoRAConfig:
    """Read ``src/config_name``, check it equals the checksummed copy in ``src/weights_name``, validate it.

    Raises:
        CheckpointError: Naming the file, on a missing or unreadable file, a JSON that is not the
            checksummed copy (naming the first field that differs, with both values), or any field that
            :func:`validate` refuses.
    """
    cfg_path, weights = src / config_name, src / weights_name
    try:
        text = cfg_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise CheckpointError(f"{src}: not a hyperloom LoRA directory ({config_name}: {why})") from None
    try:
        cfg = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{cfg_path}: not JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("format") != fmt:
        got = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
        raise CheckpointError(f"{cfg_path}: format {short_repr(got)}, expected {fmt!r}")
    _, meta = load_safetensors(weights, require_checksums=True)
    try:
        copy = json.loads(meta["config"])
    except (KeyError, json.JSONDecodeError, RecursionError):
        raise CheckpointError(f"{weights}: holds no checksummed copy of the config (not written by save_pretrained)") from None
    diff = _first_difference(cfg, copy)
    if diff is not None:
        field, edited, kept = diff
        raise CheckpointError(
            f"{cfg_path}: {field} is {short_repr(edited)}, but the checksummed copy in {weights_name} says {short_repr(kept)} "
            "(the JSON was edited or is corrupt; the weights were trained with the copy's value)"
        )
    return validate(cfg_path, copy, fmt, hyper_keys)
