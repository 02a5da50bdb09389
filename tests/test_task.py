"""hl.Task: learned task-id inputs (declaration, id validation, per-sample mixes, growth, checkpoints)."""

import re

import numpy as np
import pytest
import torch
from torch import nn

import hyperloom as hl


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _model(**task):
    return hl.hypernetize(_mlp(), inputs={"task": hl.Task(3, dim=4, **task), "lam": (0.0, 1.0)}, hidden=(8,))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_tasks": 0}, "Task num_tasks must be an integer >= 1, got 0"),
        ({"num_tasks": 2.0}, "Task num_tasks must be an integer >= 1, got 2.0"),
        ({"num_tasks": True}, "Task num_tasks must be an integer >= 1, got True"),
        ({"num_tasks": 2, "dim": 0}, "Task dim must be an integer >= 1, got 0"),
        ({"num_tasks": 3, "max_tasks": 2}, "Task max_tasks must be an integer >= num_tasks=3, got 2"),
        ({"num_tasks": 2, "norm": "l2"}, "Task norm must be one of 'unit', None, got 'l2'"),
    ],
)
def test_declaration_errors(kwargs, message):
    with pytest.raises(hl.HyperloomError, match=re.escape(message)):
        hl.Task(**kwargs)


def test_declaration_defaults_and_numpy_ints():
    t = hl.Task(np.int64(3))
    assert (t.num_tasks, t.dim, t.norm, t.max_tasks, t.capacity) == (3, 8, "unit", 3, 3)
    assert type(t.num_tasks) is int


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (3, "Task input 'task': id 3 is out of range; valid ids are 0..2 (3 tasks)"),
        (-1, "Task input 'task': id -1 is out of range; valid ids are 0..2 (3 tasks)"),
        (torch.tensor([0, 2, 5]), "Task input 'task': id 5 at sample 2 is out of range; valid ids are 0..2 (3 tasks)"),
        (torch.tensor(-2), "Task input 'task': id -2 is out of range; valid ids are 0..2 (3 tasks)"),
        (1.0, "Task input 'task': expected an int id in [0, 2] or an integer tensor of ids of shape (B,), got the non-integer float 1.0"),
        (True, "Task input 'task': expected an int id in [0, 2] or an integer tensor of ids of shape (B,), got bool True"),
        (np.bool_(True), "got bool np.True_"),
        (torch.tensor([True, False]), "got bool tensor([ True, False])"),
        (torch.tensor([0.0, 1.0]), "got a tensor of non-integer dtype torch.float32"),
        ([0.5, 1.0], "got a tensor of non-integer dtype torch.float32"),
        (np.float32(1.0), "got the non-integer float32 np.float32(1.0)"),
        (torch.zeros(2, 2, dtype=torch.long), "got shape (2, 2)"),
        ("a", "got str 'a'"),
    ],
)
def test_ids_are_validated(value, message):
    model = _model()
    x = torch.randn(3, 4)
    with pytest.raises(hl.HyperloomError, match=re.escape(message)):
        model(x, task=value, lam=0.5)


def test_per_sample_count_must_match():
    model = _model()
    with pytest.raises(hl.HyperloomError, match=re.escape("Conditioning input 'lam' has 2 per-sample values but 'task' has 3")):
        model(torch.randn(3, 4), task=torch.tensor([0, 1, 2]), lam=torch.rand(2))
    with pytest.raises(hl.HyperloomError, match=re.escape("Conditioning input 'task' has 2 per-sample values but the batch has 3 samples")):
        model.hypernet.input_set.prepare({"task": torch.tensor([0, 1]), "lam": 0.5}, batch=3, dtype=torch.float32)


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_per_sample_mixed_tasks_equal_a_loop_of_shared_calls(mode):
    torch.manual_seed(1)
    model = hl.hypernetize(_mlp(), inputs={"task": hl.Task(3, dim=4), "lam": (0.0, 1.0)}, hidden=(8,), per_sample=mode)
    x = torch.randn(6, 4)
    ids = torch.tensor([2, 0, 1, 1, 0, 2])
    lam = torch.rand(6)
    out = model(x, task=ids, lam=lam)
    ref = torch.cat([model(x[i : i + 1], task=int(ids[i]), lam=float(lam[i])) for i in range(6)])
    torch.testing.assert_close(out, ref)
    shared_lam = model(x, task=ids, lam=0.25)  # per-sample tasks, one lam for the batch
    ref2 = torch.cat([model(x[i : i + 1], task=int(ids[i]), lam=0.25) for i in range(6)])
    torch.testing.assert_close(shared_lam, ref2)


def test_tasks_change_the_weights_and_ids_in_numpy_or_lists_work():
    model = _model()
    w = [model.generate(task=t, lam=0.5)["0.weight"] for t in range(3)]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    per = model.generate(task=[0, 1, 2], lam=0.5)["0.weight"]
    torch.testing.assert_close(per, torch.stack(w))
    assert torch.equal(model.generate(task=np.int64(1), lam=0.5)["0.weight"], w[1])


def test_unit_norm_embedding_and_the_plain_ablation():
    unit, plain = _model(), _model(norm=None)
    for m in (unit, plain):
        with torch.no_grad():
            m.hypernet.task_table().weight.mul_(5.0)  # a drifted magnitude
    raw, _ = unit.hypernet.prepare({"task": torch.tensor([0, 1, 2]), "lam": torch.tensor([0.0, 0.3, 1.0])})
    f_unit = unit.hypernet.features(raw)
    assert f_unit.shape == (3, 2 + 4)  # cos|sin of lam, then the embedding
    torch.testing.assert_close(f_unit.norm(dim=1), torch.full((3,), 2.0**0.5))  # constant norm sqrt(k + 1)
    f_plain = plain.hypernet.features(raw)
    torch.testing.assert_close(f_plain[:, 2:], plain.hypernet.task_table().weight[:3])


def test_task_only_model_and_default_formulation():
    model = hl.hypernetize(_mlp(), inputs={"task": hl.Task(2, dim=3)}, hidden=(8,))
    assert model.hypernet.trunk.layers[0].in_features == 3
    assert model(torch.randn(2, 4), task=torch.tensor([0, 1])).shape == (2, 3)
    default = hl.hypernetize(_mlp(), inputs={"task": hl.Task(2, dim=3), "lam": (0.0, 2.0)}, hidden=(8,), formulation="default")
    raw, _ = default.hypernet.prepare({"task": 1, "lam": 2.0})
    torch.testing.assert_close(default.hypernet.features(raw)[0, 0], torch.tensor(2.0))  # raw lam, then the embedding


def test_state_dict_names_and_gradient_reach_only_used_rows():
    model = _model()
    names = list(model.state_dict())
    assert "hypernet.tasks.task.weight" in names and "hypernet.tasks.task.num_tasks" in names
    model(torch.randn(2, 4), task=torch.tensor([0, 2]), lam=0.5).sum().backward()
    grad = model.hypernet.task_table().weight.grad
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0
    assert torch.equal(grad[1], torch.zeros(4))


def test_add_task_keeps_old_outputs_and_the_optimiser():
    model = hl.hypernetize(_mlp(), inputs={"task": hl.Task(1, dim=4, max_tasks=3), "lam": (0.0, 1.0)}, hidden=(8,))
    x = torch.randn(5, 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        model(x, task=0, lam=0.5).pow(2).mean().backward()
        opt.step()
    table = model.hypernet.task_table().weight
    before = model(x, task=0, lam=0.5).detach().clone()
    state_before = opt.state[table]["exp_avg"]
    with pytest.raises(hl.HyperloomError, match=re.escape("Task input 'task': id 1 is out of range; valid ids are 0..0 (1 task)")):
        model(x, task=1, lam=0.5)
    assert model.add_task() == range(1, 2)
    assert model.inputs["task"].num_tasks == 2 and int(model.hypernet.task_table().num_tasks) == 2
    assert model.hypernet.task_table().weight is table and opt.state[table]["exp_avg"] is state_before
    assert torch.equal(model(x, task=0, lam=0.5), before)  # bit-identical
    row1 = table[1].detach().clone()
    opt.zero_grad()
    model(x, task=1, lam=0.5).pow(2).mean().backward()
    opt.step()  # the optimiser built before the new task keeps stepping
    assert not torch.equal(table[1], row1)
    assert model.add_task("task", n=1) == range(2, 3)
    with pytest.raises(hl.HyperloomError, match=re.escape("add_task('task', n=1): 'task' already uses 3 of its max_tasks=3 tasks")):
        model.add_task()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("lam",), "'lam' is not a Task input; Task inputs are ['task'], inputs are ['task', 'lam']"),
        (("task", 0), "add_task('task'): n must be an integer >= 1, got 0"),
        (("task", 1.0), "add_task('task'): n must be an integer >= 1, got 1.0"),
    ],
)
def test_add_task_errors(args, message):
    model = _model(max_tasks=5)
    with pytest.raises(hl.HyperloomError, match=re.escape(message)):
        model.add_task(*args)


def test_add_task_needs_a_name_with_several_task_inputs():
    h = hl.HyperNetwork({"a": hl.Task(1, max_tasks=2), "b": hl.Task(1, max_tasks=2)}, {"w": (2,)}, hidden=(4,))
    with pytest.raises(hl.HyperloomError, match=re.escape("Name the Task input: the hypernetwork has 2 (['a', 'b'])")):
        h.add_task()
    assert h.add_task("b") == range(1, 2)
    assert h({"a": 0, "b": torch.tensor([0, 1])})["w"].shape == (2, 2)


def test_checkpoint_restores_grown_task_count_and_checks_declarations(tmp_path):
    model = hl.hypernetize(_mlp(), inputs={"task": hl.Task(1, dim=4, max_tasks=3), "lam": (0.0, 1.0)}, hidden=(8,))
    model.add_task()
    path = tmp_path / "m.safetensors"
    hl.save_model(model, path)
    fresh = hl.hypernetize(_mlp(), inputs={"task": hl.Task(1, dim=4, max_tasks=3), "lam": (0.0, 1.0)}, hidden=(8,))
    hl.load_model(fresh, path)
    assert fresh.inputs["task"].num_tasks == 2
    x = torch.randn(2, 4)
    assert torch.equal(fresh(x, task=1, lam=0.5), model(x, task=1, lam=0.5))
    other = hl.hypernetize(_mlp(), inputs={"task": hl.Task(1, dim=4, max_tasks=3, norm=None), "lam": (0.0, 1.0)}, hidden=(8,))
    with pytest.raises(hl.CheckpointError, match=re.escape("input 'task' norm: saved 'unit', model None")):
        hl.load_model(other, path)
    cont = hl.hypernetize(_mlp(), inputs={"task": (0.0, 1.0), "lam": (0.0, 1.0)}, hidden=(8,))
    with pytest.raises(hl.CheckpointError, match=re.escape("input 'task' kind: saved 'Task', model 'Input'")):
        hl.load_model(cont, path)


def test_loading_an_impossible_task_count_is_refused():
    model = _model()
    state = model.state_dict()
    state["hypernet.tasks.task.num_tasks"] = torch.tensor(7)
    with pytest.raises(hl.HyperloomError, match=re.escape("tasks.task.num_tasks: loaded 7, expected an integer in [1, max_tasks=3]")):
        model.load_state_dict(state)
    assert model.inputs["task"].num_tasks == 3 and int(model.hypernet.task_table().num_tasks) == 3


def test_ids_must_be_exact_in_the_dtype():
    # ids travel at least in float32: 2**24 + 1 rows cannot be addressed exactly (checked before allocating)
    with pytest.raises(
        hl.HyperloomError, match=re.escape("Task: max_tasks=16777217 ids cannot be held exactly in torch.float32 (at most 16777216)")
    ):
        hl.HyperNetwork({"task": hl.Task(2**24 + 1, dim=1)}, {"w": (2,)}, hidden=(4,), dtype=torch.bfloat16)


@pytest.mark.parametrize(("dtype", "ids"), [(torch.bfloat16, (256, 257)), (torch.float16, (2048, 2049))])
@pytest.mark.parametrize("cast", ["to", "build"])
def test_task_ids_never_travel_in_half_precision(dtype, ids, cast):
    # task 257 used to get task 256's weights after .to(torch.bfloat16) (above 2048 after .half())
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    inputs = {"task": hl.Task(ids[1] + 1, dim=4), "lam": (0.0, 1.0)}
    if cast == "to":
        hnet = hl.hypernetize(net, inputs=inputs, hidden=(8,)).to(dtype)
    else:
        hnet = hl.hypernetize(net.to(dtype), inputs=inputs, hidden=(8,))
    a, b = (hnet.generate(task=i, lam=0.5)["0.weight"] for i in ids)
    assert not torch.equal(a, b)
    table = hnet.hypernet.task_table().weight
    assert not torch.equal(table[ids[0]], table[ids[1]])
    # per sample: each row equals the shared call for its id
    x = torch.randn(2, 3, dtype=dtype)
    w = hnet.generate(task=torch.tensor(ids), lam=0.5)["0.weight"]
    torch.testing.assert_close(w, torch.stack([a, b]))
    assert not torch.equal(w[0], w[1])
    per_sample = hnet(x, task=torch.tensor(ids), lam=0.5)
    for i, t in enumerate(ids):
        torch.testing.assert_close(per_sample[i : i + 1], hnet(x[i : i + 1], task=t, lam=0.5))


def test_skipped_checks_clamp_ids():
    s = hl.InputSet({"task": hl.Task(3), "lam": (0.0, 1.0)})
    raw, per_sample = s.prepare({"task": torch.tensor([-1, 7]), "lam": 0.5}, dtype=torch.float32, check=False)
    assert per_sample and raw[:, 0].tolist() == [0.0, 2.0]
    assert s.total_dim == 2 and s.midpoint().tolist() == [[0.0, 0.5]]


def test_a_plain_embedding_checkpoint_does_not_load_into_a_unit_one(tmp_path):
    plain = hl.hypernetize(nn.Linear(3, 2), inputs={"task": hl.Task(2, norm=None)}, hidden=(4,))
    path = tmp_path / "plain.safetensors"
    hl.save_model(plain, path)
    unit = hl.hypernetize(nn.Linear(3, 2), inputs={"task": hl.Task(2)}, hidden=(4,))
    with pytest.raises(hl.CheckpointError, match=re.escape("input 'task' norm: saved None, model 'unit'")):
        hl.load_model(unit, path)
    bigger = hl.hypernetize(nn.Linear(3, 2), inputs={"task": hl.Task(2, norm=None, max_tasks=4)}, hidden=(4,))
    with pytest.raises(hl.CheckpointError, match=re.escape("input 'task' max_tasks: saved 2, model 4")):
        hl.load_model(bigger, path)


def test_unsigned_task_ids_work_or_are_refused_clearly():
    import re

    m = hl.hypernetize(nn.Linear(3, 2), inputs={"task": hl.Task(2)}, hidden=(8,))
    x = torch.randn(2, 3)
    ref = m(x, task=torch.tensor([0, 1]))
    for dt in ("uint8", "uint16", "uint32"):
        if hasattr(torch, dt):
            assert torch.equal(m(x, task=torch.tensor([0, 1], dtype=getattr(torch, dt))), ref), dt
            assert torch.equal(m(x, task=torch.tensor(1, dtype=getattr(torch, dt))), m(x, task=1)), dt
    if hasattr(torch, "uint64"):
        with pytest.raises(hl.HyperloomError, match=re.escape("pass int64 ids")):
            m(x, task=torch.tensor([0, 1], dtype=torch.uint64))


@pytest.mark.parametrize("dtype,num_tasks,ids", [("int8", 200, [0, 100]), ("uint8", 300, [50, 255]), ("int16", 40000, [0, 32767])])
def test_narrow_integer_ids_are_compared_against_num_tasks_without_wrapping(dtype, num_tasks, ids):
    # the range check compared in the ids' own dtype: num_tasks 200 wrapped to -56 in int8 and every id was refused
    m = hl.hypernetize(nn.Linear(3, 2), inputs={"task": hl.Task(num_tasks, dim=4)}, hidden=(8,))
    x = torch.randn(2, 3)
    t = torch.tensor(ids, dtype=getattr(torch, dtype))
    assert torch.equal(m(x, task=t), m(x, task=torch.tensor(ids)))
    assert torch.equal(m(x[:1], task=t[1]), m(x[:1], task=ids[1]))
    small = hl.hypernetize(nn.Linear(3, 2), inputs={"task": hl.Task(3, dim=4)}, hidden=(8,))  # and still refused above
    i = next(i for i, v in enumerate(ids) if v >= 3)
    with pytest.raises(hl.HyperloomError, match=f"id {ids[i]} at sample {i} is out of range; valid ids are 0..2"):
        small(x, task=t)
