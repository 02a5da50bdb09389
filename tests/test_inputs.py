import math
import re

import pytest
import torch

import hyperloom as hl
from hyperloom import HyperloomError, Input, InputSet


def test_linear_and_log_normalisation():
    lin = Input(-2.0, 2.0)
    assert torch.allclose(lin.normalize(torch.tensor([-2.0, 0.0, 2.0])), torch.tensor([0.0, 0.5, 1.0]))
    log = Input(1e-3, 1e1, scale="log")
    u = log.normalize(torch.tensor([1e-3, 1e-1, 1e1]))
    assert torch.allclose(u, torch.tensor([0.0, 0.5, 1.0]), atol=1e-6)
    assert math.isclose(log.midpoint(), 1e-1, rel_tol=1e-9)


def test_normalize_clamps_without_branching():
    spec = Input(0.0, 1.0, out_of_range="clamp")
    x = torch.tensor([-1.0, 0.5, 3.0])
    assert torch.equal(spec.normalize(x), torch.tensor([0.0, 0.5, 1.0]))
    # branch-free: works under vmap
    out = torch.func.vmap(spec.normalize)(x)
    assert torch.equal(out, torch.tensor([0.0, 0.5, 1.0]))


@pytest.mark.parametrize(
    ("kwargs", "msg"),
    [
        ({"low": 1.0, "high": 0.0}, "Input range must satisfy low < high, got low=1.0, high=0.0"),
        ({"low": 0.0, "high": float("inf")}, "Input range must be finite"),
        ({"low": 0.0, "high": 1.0, "scale": "log"}, "A log-scale input needs low > 0, got low=0.0"),
        ({"low": 0.0, "high": 1.0, "scale": "cubic"}, "Input scale must be one of 'linear', 'log', got 'cubic'"),
        ({"low": 0.0, "high": 1.0, "dim": 0}, "Input dim must be an integer >= 1, got 0"),
        ({"low": 0.0, "high": 1.0, "out_of_range": "warn"}, "out_of_range must be one of 'raise', 'clamp'"),
        ({"low": "a", "high": 1.0}, "Input range must be real numbers, got low='a', high=1.0"),
        ({"low": 0, "high": 10**400}, "Input range must be finite, got low=0, high=1000"),
    ],
)
def test_bad_declarations(kwargs, msg):
    with pytest.raises(HyperloomError, match=re.escape(msg)):
        Input(**kwargs)


def test_inputset_parses_tuples_and_specs():
    s = InputSet({"lam": (0.0, 1.0), "lr": (1e-4, 1e-1, "log"), "z": Input(0, 1, dim=3)})
    assert s.names == ("lam", "lr", "z")
    assert s.total_dim == 5
    assert s.specs["lr"].scale == "log"


@pytest.mark.parametrize(
    ("inputs", "msg"),
    [
        ({}, "inputs must be a non-empty mapping"),
        ({"not valid": (0, 1)}, "Input names must be Python identifiers, got 'not valid'"),
        ({"lam": 3}, "inputs['lam']: expected hl.Input(low, high, ...)"),
    ],
)
def test_inputset_bad(inputs, msg):
    with pytest.raises(HyperloomError, match=re.escape(msg)):
        InputSet(inputs)


def test_prepare_shared_and_per_sample():
    s = InputSet({"lam": (0.0, 1.0), "z": Input(0, 1, dim=2)})
    raw, per = s.prepare({"lam": 0.25, "z": [0.1, 0.2]}, dtype=torch.float64)
    assert not per and raw.shape == (1, 3) and raw.dtype == torch.float64
    raw, per = s.prepare({"lam": torch.rand(4), "z": [0.1, 0.2]}, batch=4, dtype=torch.float32)
    assert per and raw.shape == (4, 3)
    assert torch.allclose(raw[:, 1:], torch.tensor([0.1, 0.2]).expand(4, 2))
    raw, per = s.prepare({"lam": 0.5, "z": torch.rand(3, 2)}, dtype=torch.float32)
    assert per and raw.shape == (3, 3)


@pytest.mark.parametrize(
    ("values", "batch", "msg"),
    [
        ({"lam": 0.5, "mu": 1.0}, None, "Unknown conditioning input(s) ['mu']; declared inputs are ['lam', 'z']"),
        ({"lam": 0.5}, None, "Missing conditioning input(s) ['z']; declared inputs are ['lam', 'z']"),
        (
            {"lam": torch.rand(3), "z": [0.1, 0.2]},
            4,
            "Conditioning input 'lam' has 3 per-sample values but the batch has 4 samples",
        ),
        (
            {"lam": torch.rand(3), "z": torch.rand(2, 2)},
            None,
            "Conditioning input 'z' has 2 per-sample values but 'lam' has 3",
        ),
        (
            {"lam": torch.rand(3, 2), "z": [0.1, 0.2]},
            3,
            "Conditioning input 'lam': expected a number, a 0-d tensor or shape (3,) with one value per sample, got shape (3, 2)",
        ),
        (
            {"lam": 0.5, "z": [0.1, 0.2, 0.3]},
            None,
            "Conditioning input 'z': expected shape (2,) or (B, 2) with one row per sample, got shape (3,)",
        ),
        ({"lam": float("nan"), "z": [0.1, 0.2]}, None, "Conditioning input 'lam' has a non-finite value nan at sample 0"),
        (
            {"lam": 0.5, "z": torch.tensor([[0.1, float("inf")]])},
            None,
            "Conditioning input 'z' has a non-finite value inf at sample 0, coordinate 1",
        ),
        (
            {"lam": torch.tensor([0.5, 1.5]), "z": [0.1, 0.2]},
            None,
            "Conditioning input 'lam' out of its declared range [0.0, 1.0]: got values in [0.5, 1.5]",
        ),
        ({"lam": "high", "z": [0.1, 0.2]}, None, "Conditioning input 'lam' must be a number, a sequence of numbers"),
        ({"lam": True, "z": [0.1, 0.2]}, None, "Conditioning input 'lam' must be a number or tensor, got bool"),
        (
            {"lam": torch.tensor(0.5j), "z": [0.1, 0.2]},
            None,
            "Conditioning input 'lam' must be real numbers, got dtype torch.complex64",
        ),
    ],
)
def test_prepare_errors_name_the_input(values, batch, msg):
    s = InputSet({"lam": (0.0, 1.0), "z": Input(0, 1, dim=2)})
    with pytest.raises(HyperloomError, match=re.escape(msg)):
        s.prepare(values, batch=batch, dtype=torch.float32)


def test_clamp_mode_accepts_out_of_range():
    s = InputSet({"lam": Input(0.0, 1.0, out_of_range="clamp")})
    raw, _ = s.prepare({"lam": 2.0}, dtype=torch.float32)
    assert torch.equal(s.normalize(raw), torch.ones(1, 1))


def test_integer_tensors_are_cast():
    s = InputSet({"task": (0, 9)})
    raw, per = s.prepare({"task": torch.tensor([1, 2, 3])}, dtype=torch.float32)
    assert per and raw.dtype == torch.float32


def test_device_mismatch_is_named():
    s = InputSet({"lam": (0.0, 1.0)})
    with pytest.raises(HyperloomError, match=re.escape("Conditioning input 'lam' is on cpu but the hypernetwork is on meta")):
        s.prepare({"lam": torch.tensor(0.5)}, dtype=torch.float32, device="meta")


def test_public_alias():
    assert hl.Input is Input


# -- declared endpoints in every dtype ------------------------------------------------------------

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
RANGES = [(0.0, 0.1), (1e-4, 1e-1, "log"), (-0.3, 0.7), (0.2, 1.7), (1e-30, 1.0, "log"), (-1e-30, 1e-30)]


def _up(x: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(abs(steps)):
        x = torch.nextafter(x, torch.full_like(x, math.inf if steps > 0 else -math.inf))
    return x


@pytest.mark.parametrize("decl", RANGES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_declared_endpoints_are_accepted_in_every_dtype(decl, dtype):
    s = InputSet({"lam": decl})
    low, high = decl[0], decl[1]
    for value_dtype in DTYPES:  # the value's own dtype need not be the hypernetwork's
        for v in (low, high):
            for given in (v, [v], torch.tensor(v, dtype=value_dtype), torch.tensor([v, v], dtype=value_dtype)):
                raw, _ = s.prepare({"lam": given}, dtype=dtype)
                assert raw.dtype == dtype
                u = s.normalize(raw)
                assert bool(((u >= 0) & (u <= 1)).all()), (given, u)
    raw, _ = s.prepare({"lam": torch.tensor([low, high], dtype=torch.float64)}, dtype=dtype)
    u = s.normalize(raw)[:, 0].double()
    atol = 4 * torch.finfo(dtype).eps
    if raw[0, 0] != raw[1, 0]:  # (-1e-30, 1e-30) is one value in float16
        assert 0 <= u[0] <= atol and 1 - atol <= u[1] <= 1, u


@pytest.mark.parametrize("decl", RANGES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_values_just_outside_the_range_are_refused(decl, dtype):
    s = InputSet({"lam": decl})
    low, high = decl[0], decl[1]
    msg = "Conditioning input 'lam' out of its declared range"
    # a Python float is exact: one float64 ulp outside is outside, whatever the hypernetwork's dtype
    for v in (math.nextafter(high, math.inf), math.nextafter(low, -math.inf), high + 3 * math.ulp(high)):
        with pytest.raises(HyperloomError, match=re.escape(msg)):
            s.prepare({"lam": v}, dtype=dtype)
    # a tensor is compared in its own precision: two of its ulps beyond the endpoint's rounding is outside
    for value_dtype in DTYPES:
        for v, steps in ((high, 2), (low, -2)):
            t = _up(torch.tensor(v, dtype=value_dtype), steps)
            with pytest.raises(HyperloomError, match=re.escape(msg)):
                s.prepare({"lam": t}, dtype=dtype)
            with pytest.raises(HyperloomError, match=re.escape(msg)):
                s.prepare({"lam": torch.stack([torch.tensor(low, dtype=value_dtype), t])}, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_endpoint_examples_from_the_report(dtype):
    s = InputSet({"lam": (0.0, 0.1), "lr": (1e-4, 1e-1, "log")})
    s.prepare({"lam": 0.1, "lr": 1e-4}, dtype=dtype)
    s.prepare({"lam": torch.tensor(0.1, dtype=dtype), "lr": torch.tensor(1e-1, dtype=dtype)}, dtype=dtype)
    s.prepare({"lam": torch.tensor(0.1, dtype=torch.bfloat16), "lr": torch.tensor(1e-4, dtype=torch.bfloat16)}, dtype=dtype)
    msg = "Conditioning input 'lam' out of its declared range [0.0, 0.1]: got values in [0.1001, 0.1001]"
    with pytest.raises(HyperloomError, match=re.escape(msg)):
        s.prepare({"lam": 0.1001, "lr": 1e-2}, dtype=dtype)
    with pytest.raises(
        HyperloomError, match=re.escape("Conditioning input 'lam' out of its declared range [0.0, 0.1]: got values in [0.100")
    ):
        s.prepare({"lam": torch.tensor(0.1001, dtype=torch.float32), "lr": 1e-2}, dtype=dtype)


def test_numpy_scalars_are_compared_in_their_own_precision():
    np = pytest.importorskip("numpy")
    s = InputSet({"lam": (0.0, 0.1)})
    for v in (np.float16(0.1), np.float32(0.1), np.float64(0.1), np.array([0.0, 0.1], dtype=np.float32)):
        raw, _ = s.prepare({"lam": v}, dtype=torch.float32)
        assert float(raw.max()) == pytest.approx(0.1, rel=1e-3)
    with pytest.raises(HyperloomError, match=re.escape("Conditioning input 'lam' out of its declared range")):
        s.prepare({"lam": np.float32(0.1001)}, dtype=torch.float32)


# -- clamp mode clamps the raw values too ---------------------------------------------------------


@pytest.mark.parametrize("check", [True, False])
def test_clamp_mode_clamps_raw_values(check):
    s = InputSet({"lam": (0.0, 1.0), "g": Input(-1.0, 2.0, out_of_range="clamp"), "z": Input(0, 1, dim=2, out_of_range="clamp")})
    raw, per = s.prepare({"lam": 0.5, "g": 5.0, "z": [-3.0, 0.25]}, dtype=torch.float32, check=check)
    assert not per and torch.equal(raw, torch.tensor([[0.5, 2.0, 0.0, 0.25]]))
    g = torch.tensor([5.0, -7.0, 0.5, 2.0])
    raw, per = s.prepare({"lam": 0.5, "g": g, "z": torch.tensor([[2.0, -1.0]] * 4)}, dtype=torch.float64, check=check)
    assert per and torch.equal(raw[:, 1], torch.tensor([2.0, -1.0, 0.5, 2.0], dtype=torch.float64))
    assert torch.equal(raw[:, 2:], torch.tensor([[1.0, 0.0]] * 4, dtype=torch.float64))
    assert torch.equal(raw[:, 0], torch.full((4,), 0.5, dtype=torch.float64))


def test_clamp_mode_huge_values_clamp_to_the_endpoint():
    s = InputSet({"g": Input(0.0, 1.0, out_of_range="clamp")})
    for v in (1e40, 10**400, -(10**400), torch.tensor(1e300, dtype=torch.float64)):
        raw, _ = s.prepare({"g": v}, dtype=torch.float32)
        assert raw.item() == (0.0 if not isinstance(v, torch.Tensor) and v < 0 else 1.0)
    with pytest.raises(HyperloomError, match=re.escape("Conditioning input 'g' has a non-finite value inf at sample 0")):
        s.prepare({"g": math.inf}, dtype=torch.float32)


# -- bools, dims, overflow, messages, names --------------------------------------------------------


def test_numpy_and_tensor_bools_are_refused():
    np = pytest.importorskip("numpy")
    s = InputSet({"lam": (0.0, 1.0)})
    with pytest.raises(HyperloomError, match=re.escape("Conditioning input 'lam' must be a number or tensor, got bool np.True_")):
        s.prepare({"lam": np.True_}, dtype=torch.float32)
    for v in (np.array([True, False]), np.array(False), torch.tensor(True), torch.tensor([True, False]), [True, False]):
        with pytest.raises(HyperloomError, match=re.escape("Conditioning input 'lam' must be real numbers, got bools (dtype ")):
            s.prepare({"lam": v}, dtype=torch.float32)


@pytest.mark.parametrize(
    ("dim", "msg"),
    [
        (True, "Input dim must be an integer >= 1, got True"),
        (False, "Input dim must be an integer >= 1, got False"),
        (2.0, "Input dim must be an integer >= 1, got 2.0"),
        (2.5, "Input dim must be an integer >= 1, got 2.5"),
        ("2", "Input dim must be an integer >= 1, got '2'"),
        (-1, "Input dim must be an integer >= 1, got -1"),
    ],
)
def test_bad_dims(dim, msg):
    with pytest.raises(HyperloomError, match=re.escape(msg)):
        Input(0.0, 1.0, dim=dim)


def test_numpy_int_dim_is_accepted():
    np = pytest.importorskip("numpy")
    with pytest.raises(HyperloomError, match=re.escape("Input dim must be an integer >= 1, got np.True_")):
        Input(0.0, 1.0, dim=np.True_)
    spec = Input(0.0, 1.0, dim=np.int64(3))
    assert spec.dim == 3 and type(spec.dim) is int
    assert InputSet({"z": spec}).total_dim == 3


def test_overflowing_value_is_reported_as_out_of_range():
    s = InputSet({"lam": (0.0, 1.0)})
    msg = "Conditioning input 'lam' out of its declared range [0.0, 1.0]: got values in [1e+40, 1e+40]"
    with pytest.raises(HyperloomError, match=re.escape(msg)):
        s.prepare({"lam": 1e40}, dtype=torch.float32)
    with pytest.raises(HyperloomError, match=re.escape(msg)):
        s.prepare({"lam": torch.tensor(1e40, dtype=torch.float64)}, dtype=torch.float32)
    with pytest.raises(HyperloomError, match=re.escape(f"got values in [{10**400}, {10**400}]")):
        s.prepare({"lam": 10**400}, dtype=torch.float32)


def test_range_wider_than_the_dtype_is_named():
    s = InputSet({"lam": (0.0, 1e6)})
    msg = "Conditioning input 'lam' value 100000.0 overflows torch.float16 (largest finite value 65504.0)"
    with pytest.raises(HyperloomError, match=re.escape(msg)):
        s.prepare({"lam": 1e5}, dtype=torch.float16)
    raw, _ = s.prepare({"lam": 1e4}, dtype=torch.float16)
    assert raw.item() == 1e4


@pytest.mark.parametrize(
    ("value", "batch", "msg"),
    [
        (torch.rand(3, 2), None, "expected a number, a 0-d tensor or shape (B,) with one value per sample, got shape (3, 2)"),
        (torch.rand(3, 2), 3, "expected a number, a 0-d tensor or shape (3,) with one value per sample, got shape (3, 2)"),
    ],
)
def test_shape_message_reads_well(value, batch, msg):
    s = InputSet({"lam": (0.0, 1.0)})
    with pytest.raises(HyperloomError, match=re.escape(f"Conditioning input 'lam': {msg}")):
        s.prepare({"lam": value}, batch=batch, dtype=torch.float32)
    assert "B = B" not in msg


@pytest.mark.parametrize("name", ["lambda", "class", "None", "True"])
def test_keyword_names_are_refused(name):
    msg = f"Input name {name!r} is a Python keyword and cannot be passed as a keyword argument; use e.g. '{name}_'"
    with pytest.raises(HyperloomError, match=re.escape(msg)):
        InputSet({name: (0.0, 1.0)})


def test_meta_tensors_skip_value_checks():
    s = InputSet({"lam": (0.0, 1.0), "z": Input(0, 1, dim=2)})
    raw, per = s.prepare({"lam": torch.empty(4, device="meta"), "z": [0.1, 0.2]}, dtype=torch.float32, device="meta")
    assert per and raw.shape == (4, 3) and raw.device.type == "meta"


def test_zero_d_and_one_d_agree():
    s = InputSet({"lam": (1e-30, 1.0, "log")})
    a, pa = s.prepare({"lam": torch.tensor(1e-30)}, dtype=torch.float32)
    b, pb = s.prepare({"lam": torch.tensor([1e-30])}, dtype=torch.float32)
    assert not pa and pb and torch.equal(a, b)


def test_bool_and_string_ranges_are_refused():
    np = pytest.importorskip("numpy")
    for low, high in ((False, True), (np.bool_(False), 1), (torch.tensor(False), 1), ("0", "1e-1")):
        with pytest.raises(HyperloomError, match=re.escape("Input range must be real numbers")):
            hl.Input(low, high)


def test_integer_endpoint_beyond_float_precision_is_accepted():
    # Input(0, 10**23) refused 10**23: the int was compared exactly with the endpoint rounded to a float
    s = hl.InputSet({"n": hl.Input(0, 10**23)})
    raw, _ = s.prepare({"n": 10**23}, dtype=torch.float64)
    assert raw.item() == 1e23
    with pytest.raises(HyperloomError, match=re.escape("out of its declared range")):
        s.prepare({"n": 2 * 10**23}, dtype=torch.float64)
