"""Capturing and restoring every random stream a run draws from: torch (CPU and CUDA), Python, numpy."""

from __future__ import annotations

import random
import sys
from collections.abc import Mapping
from typing import Any

import torch


def rng_state() -> dict[str, Any]:
    """The states of torch's CPU and CUDA generators, Python's ``random`` and numpy's (when imported).

    numpy is read only if something imported it already (the core does not import it).
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": []}
    if torch.cuda.is_available():  # pragma: no cover - no GPU in CI
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")
    if np is not None:
        state["numpy"] = np.random.get_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore states captured by :func:`rng_state` (or parsed from a checkpoint in the same layout)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():  # pragma: no cover - no GPU in CI
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
