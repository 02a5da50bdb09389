"""hyperloom: turn any PyTorch model into a hypernetwork model, MIP by default.

Magnitude Invariant Parametrizations (MIP) are the default formulation.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import hyperloom as hl
    >>> net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> hnet = hl.hypernetize(net, predict=[nn.Linear], inputs={"lam": (0.0, 1.0)})
    >>> hnet(torch.randn(8, 4), lam=0.5).shape
    torch.Size([8, 3])
"""

from . import continual
from ._version import __version__
from .checkpoint import (
    CheckpointError,
    load_model,
    load_safetensors,
    load_training,
    save_model,
    save_safetensors,
    save_training,
)
from .data_input import Data, Masked
from .derivatives import laplacian
from .diagnostics import theta_norms
from .dropout import BoundDropout, bind_dropout
from .encoding import (
    ENCODINGS,
    CosSin,
    Encoding,
    Identity,
    L2Normalize,
    Raw,
    Standardize,
    ZOneMinusZ,
    get_encoding,
)
from .errors import HyperloomError
from .heads import DenseHead, LowRankHead
from .hypernetwork import FORMULATIONS, HyperNetwork, init_theta0
from .inputs import Input, InputSet
from .lora import LoRA, LoRAModel
from .model import HyperModel, hypernetize
from .params import ParamStore
from .select import select_parameters
from .selftune import SelfTuner
from .shared_heads import Chunked, ChunkedHead, Structured, StructuredHead
from .task import Task, TaskEmbedding
from .training import NonFiniteLossError, Trainer
from .trunk import ACTIVATIONS, NORMS, Trunk, WeightNormLinear
from .tune import Sweep, Tuned, sample, sweep, tune
from .types import Conditioning, ParamDict

__all__ = [
    "ACTIVATIONS",
    "BoundDropout",
    "CheckpointError",
    "Chunked",
    "ChunkedHead",
    "Structured",
    "StructuredHead",
    "NonFiniteLossError",
    "Sweep",
    "Trainer",
    "Tuned",
    "load_model",
    "load_safetensors",
    "load_training",
    "save_model",
    "save_safetensors",
    "save_training",
    "ENCODINGS",
    "FORMULATIONS",
    "NORMS",
    "Conditioning",
    "CosSin",
    "Data",
    "DenseHead",
    "Encoding",
    "HyperModel",
    "HyperNetwork",
    "HyperloomError",
    "Identity",
    "Input",
    "InputSet",
    "L2Normalize",
    "LoRA",
    "LoRAModel",
    "LowRankHead",
    "Masked",
    "ParamDict",
    "ParamStore",
    "Raw",
    "SelfTuner",
    "Standardize",
    "Task",
    "TaskEmbedding",
    "Trunk",
    "WeightNormLinear",
    "ZOneMinusZ",
    "__version__",
    "bind_dropout",
    "continual",
    "get_encoding",
    "hypernetize",
    "init_theta0",
    "laplacian",
    "sample",
    "select_parameters",
    "sweep",
    "theta_norms",
    "tune",
]
