"""hl.continual.OutputRegularizer: snapshots, the penalty against a reference, gradients, checkpoints, Trainer resume."""

import re

import pytest
import torch
from torch import nn

import hyperloom as hl
from hyperloom.continual import OutputRegularizer


def _model(num_tasks=1, max_tasks=4, **kw):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    return hl.hypernetize(net, inputs={"task": hl.Task(num_tasks, dim=4, max_tasks=max_tasks)}, hidden=(8,), **kw)


def _reference(model, reg, ids):
    """beta * mean_k ||theta(e_k) - theta*_k||^2 from shared generate() calls, one task at a time."""
    total = []
    for k in ids:
        theta = model.generate(task=int(k))
        flat = torch.cat([theta[n].reshape(-1) for n in reg.names])
        total.append((flat - reg.targets[int(k)]).pow(2).sum())
    return reg.beta * torch.stack(total).mean()


def _train_task(model, opt, task, reg=None, steps=3):
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(task))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(task))
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x, task=task), y)
        if reg is not None:
            loss = loss + reg.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_zero_before_and_right_after_snapshot_then_matches_a_reference():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    reg = OutputRegularizer(model, beta=0.5)
    assert reg.penalty().item() == 0.0 and reg.sample().tolist() == []
    _train_task(model, opt, 0)
    reg.snapshot()
    assert int(reg.num_snapshots) == 1
    model.add_task()
    _train_task(model, opt, 1, reg)
    reg.snapshot()
    assert int(reg.num_snapshots) == 2
    p = reg.penalty()
    assert p.item() == 0.0  # exactly: the same computation as the snapshot
    model.add_task()
    _train_task(model, opt, 2, reg)
    p = reg.penalty()
    assert p.item() > 0
    torch.testing.assert_close(p, _reference(model, reg, [0, 1]))


def test_gradient_reaches_only_the_hypernetwork():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    model = hl.hypernetize(net, predict=["0"], inputs={"task": hl.Task(2, dim=4)}, hidden=(8,))  # layer 2 stays a plain parameter
    model.theta0.freeze("0.weight")
    reg = OutputRegularizer(model, beta=1.0)
    reg.snapshot()
    with torch.no_grad():
        model.hypernet.head.linear.weight.add_(0.1)
    reg.penalty().backward()
    hnet = model.hypernet
    for p in (hnet.head.linear.weight, hnet.trunk.layers[0].weight, hnet.task_table().weight, hnet.theta0["0.bias"]):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert hnet.theta0["0.weight"].grad is None  # frozen theta0
    # not predicted but trainable: shared by every task, so protected too (unchanged since the snapshot: zero gradient)
    assert reg.shared_names == ("primary.2.weight", "primary.2.bias")
    assert not model.primary[2].weight.grad.any() and not model.primary[2].bias.grad.any()
    assert not reg.targets.requires_grad and reg.targets.grad is None


def test_mixed_inputs_and_snapshot_of_tasks_declared_up_front():
    net = nn.Linear(4, 2)
    model = hl.hypernetize(net, inputs={"task": hl.Task(3, dim=4), "lam": (0.0, 1.0)}, hidden=(8,))
    reg = OutputRegularizer(model, beta=1.0, conditioning={"lam": 0.5})
    reg.snapshot(2)  # tasks 0 and 1 are learned, task 2 is not
    assert reg.sample().tolist() == [0, 1] and reg.penalty().item() == 0.0
    theta = model.generate(task=1, lam=0.5)
    torch.testing.assert_close(reg.targets[1], torch.cat([theta["weight"].reshape(-1), theta["bias"]]))
    assert torch.equal(reg.targets[2], torch.zeros(10))


def test_random_subset_is_reproducible_and_checkpointed():
    model = _model(num_tasks=4)
    reg = OutputRegularizer(model, beta=1.0, num_sampled=2, seed=3)
    reg.snapshot()
    with torch.no_grad():
        model.hypernet.head.linear.weight.mul_(1.1)
    state = {k: v.clone() for k, v in reg.state_dict().items()}
    assert set(state) == {"targets", "shared_targets", "num_snapshots", "_extra_state"}
    draws = [reg.sample() for _ in range(5)]
    assert all(len(d) == 2 and d[0] < d[1] and int(d[1]) < 4 for d in draws)
    assert len({tuple(d.tolist()) for d in draws}) > 1
    other = OutputRegularizer(model, beta=1.0, num_sampled=2, seed=99)
    other.load_state_dict(state)
    assert [other.sample().tolist() for _ in range(5)] == [d.tolist() for d in draws]
    g = torch.Generator().manual_seed(3)
    ids = torch.randperm(4, generator=g)[:2].sort().values
    fresh = OutputRegularizer(model, beta=1.0, num_sampled=2, seed=3)
    fresh.load_state_dict({**state, "_extra_state": torch.Generator().manual_seed(3).get_state()})
    torch.testing.assert_close(fresh.penalty(), _reference(model, fresh, ids.tolist()))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": -1.0}, "OutputRegularizer: beta must be a finite number >= 0, got -1.0"),
        ({"beta": float("nan")}, "OutputRegularizer: beta must be a finite number >= 0, got nan"),
        ({"num_sampled": 0}, "OutputRegularizer: num_sampled must be None or an integer >= 1, got 0"),
        ({"seed": 1.5}, "OutputRegularizer: seed must be an integer, got 1.5"),
        ({"task": "lam"}, "'lam' is not a Task input; Task inputs are ['task']"),
        ({"conditioning": {}}, "conditioning must give a value for every non-task input ['lam']; missing ['lam'], unknown []"),
        ({"conditioning": {"lam": 0.5, "z": 1}}, "missing [], unknown ['z']"),
        # one target row per task is stored: per-sample values silently paired task k with the k-th value
        ({"conditioning": {"lam": torch.tensor([0.1, 0.9])}}, "conditioning must be shared (one value per input, the same for every task)"),
    ],
)
def test_argument_errors(kwargs, message):
    model = hl.hypernetize(nn.Linear(4, 2), inputs={"task": hl.Task(2), "lam": (0.0, 1.0)}, hidden=(8,))
    kwargs = {"conditioning": {"lam": 0.5}, **kwargs}
    with pytest.raises(hl.HyperloomError, match=re.escape(message)):
        OutputRegularizer(model, **kwargs)


def test_model_and_snapshot_errors():
    plain = hl.hypernetize(nn.Linear(4, 2), inputs={"lam": (0.0, 1.0)}, hidden=(8,))
    with pytest.raises(hl.HyperloomError, match=re.escape("Name the Task input: the hypernetwork has 0 ([]); inputs are ['lam']")):
        OutputRegularizer(plain, beta=1.0)
    expected = "OutputRegularizer: expected a hypernetwork model (HyperModel, LoRAModel) or a HyperNetwork, got Linear"
    with pytest.raises(hl.HyperloomError, match=re.escape(expected)):
        OutputRegularizer(nn.Linear(2, 2), beta=1.0)
    reg = OutputRegularizer(_model(num_tasks=2), beta=1.0)
    with pytest.raises(
        hl.HyperloomError, match=re.escape("snapshot: num_tasks must be an integer in [1, 2] (the valid ids of 'task'), got 3")
    ):
        reg.snapshot(3)
    with pytest.raises(hl.HyperloomError, match=re.escape("OutputRegularizer: _extra_state must be a generator state")):
        reg.set_extra_state(torch.zeros(3))


def test_works_on_a_standalone_hypernetwork():
    h = hl.HyperNetwork({"task": hl.Task(2, dim=3)}, {"w": (2, 2)}, hidden=(4,))
    reg = OutputRegularizer(h, beta=2.0)
    reg.snapshot()
    with torch.no_grad():
        h.head.linear.weight.add_(0.5)
    expected = 2.0 * torch.stack([(h({"task": k})["w"].reshape(-1) - reg.targets[k]).pow(2).sum() for k in range(2)]).mean()
    torch.testing.assert_close(reg.penalty(), expected)


def _continual_run(path, steps, *, stop=None):
    """Three tasks through hl.Trainer (steps 0-1: task 0, 2-3: task 1, then task 2 with a penalty on 1 of 2 earlier tasks).

    At each task boundary: snapshot, add_task and an explicit checkpoint, so a resumed run knows where it is.
    """
    model = _model(num_tasks=1, max_tasks=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    reg = OutputRegularizer(model, beta=0.3, num_sampled=1, seed=5)
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(1))

    def loss_fn(model, step):
        task = 0 if step < 2 else 1 if step < 4 else 2
        noise = torch.randn(16, 4) * 0.1  # global RNG: checkpointed by the Trainer
        loss = nn.functional.cross_entropy(model(x + noise, task=task), y)
        return loss + reg.penalty(), {"task": task}

    trainer = hl.Trainer(model, opt, loss_fn, checkpoint=path, every=2, extras={"reg": reg})
    trainer.resume()
    for task, end in ((0, 2), (1, 4), (2, steps)):
        if task < 2 and int(reg.num_snapshots) > task:
            continue  # finished before the checkpoint we resumed from
        trainer.fit(min(end, stop or steps), resume=False)
        if trainer.step < end:
            break  # interrupted
        if task < 2:
            reg.snapshot()
            model.add_task()
            trainer.save()
    return model, reg


@pytest.mark.parametrize("stop", [3, 7])
def test_trainer_resume_is_bit_exact(tmp_path, stop):
    torch.manual_seed(0)
    ref_model, ref_reg = _continual_run(tmp_path / "a.safetensors", 9)
    torch.manual_seed(0)
    _continual_run(tmp_path / "b.safetensors", 9, stop=stop)  # interrupted (in task 1 or task 2)
    torch.manual_seed(123)  # the resumed process starts from another global RNG state and another initialisation
    model, reg = _continual_run(tmp_path / "b.safetensors", 9)
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for (name, a), b in zip(ref_reg.state_dict().items(), reg.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert model.inputs["task"].num_tasks == 3 and int(reg.num_snapshots) == 2


def test_trainer_extras_are_validated():
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(hl.HyperloomError, match=re.escape("extras must be a mapping of names to nn.Module, got {'reg': 3}")):
        hl.Trainer(model, opt, lambda m, s: (torch.zeros(()), {}), extras={"reg": 3})


def test_regulariser_follows_the_models_dtype_and_accepts_lora_models():
    torch.manual_seed(0)
    model = hl.hypernetize(nn.Linear(3, 2), inputs={"task": hl.Task(2)}, hidden=(8,))
    reg = hl.continual.OutputRegularizer(model, beta=1.0)
    model.double()
    reg.snapshot()
    p = reg.penalty().detach()
    assert p.dtype == torch.float64 and float(p) == 0.0  # exactly zero after the snapshot, in the model's dtype
    lora = hl.hypernetize(nn.Sequential(nn.Linear(6, 6)), inputs={"task": hl.Task(2)}, predict=["0"], lora=hl.LoRA(rank=2), hidden=(8,))
    reg2 = hl.continual.OutputRegularizer(lora, beta=1.0)
    reg2.snapshot()
    assert float(reg2.penalty().detach()) == 0.0


# ------------------------------------------------------------------------------------------------
# LoRA mode: the continual recipe, and everything that determines a task's weights is protected
# ------------------------------------------------------------------------------------------------


def _lora_model(**lora_kw):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    lora = hl.LoRA(**{"rank": 2, "alpha": 4, "targets": nn.Linear, **lora_kw})
    return hl.hypernetize(net, inputs={"task": hl.Task(1, dim=4, max_tasks=2)}, lora=lora, hidden=(16,))


def _lora_recipe(model, beta, steps=60):
    """The continual recipe (add_task, penalty, snapshot) in LoRA mode; returns task 0's weights after tasks 0 and 1."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    reg = hl.continual.OutputRegularizer(model, beta=beta)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(32, 8, generator=g), torch.randn(32, 4, generator=g)) for _ in range(2)]
    weights = []
    for task in range(2):
        if task:
            assert model.add_task() == range(1, 2)
        x, y = data[task]
        for _ in range(steps):
            loss = nn.functional.mse_loss(model(x, task=task), y) + reg.penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            weights.append({k: v.detach().clone() for k, v in model.materialize(task=0).state_dict().items()})
        reg.snapshot()
    return weights


def _drift(before, after):
    num = sum((after[k] - before[k]).pow(2).sum() for k in before).sqrt()
    return float(num / sum(before[k].pow(2).sum() for k in before).sqrt())


def test_lora_add_task_has_the_task_api_of_hypermodel():
    model = _lora_model()
    assert model.add_task() == range(1, 2) and model.inputs["task"].num_tasks == 2
    with pytest.raises(hl.HyperloomError, match=re.escape("already uses 2 of its max_tasks=2 tasks")):
        model.add_task()


def test_lora_shared_A_is_protected_in_a_real_run():
    """Task 0's Delta W = (alpha/r) B(e_0) A: with a shared A the penalty used to ignore A (drift 57 % at beta = 100)."""
    model = _lora_model(shared_A=True)
    assert hl.continual.OutputRegularizer(model).shared_names == tuple(f"lora_A.{k}" for k in ("0.lora_A", "2.lora_A"))
    w_before, w_after = _lora_recipe(model, beta=100.0)
    free_before, free_after = _lora_recipe(_lora_model(shared_A=True), beta=0.0)
    assert _drift(free_before, free_after) > 0.3  # without the regulariser task 0 is forgotten
    assert _drift(w_before, w_after) < 0.02  # measured 0.0016


def test_lora_unfrozen_base_is_protected_in_a_real_run():
    model = _lora_model(freeze_base=False)
    reg = hl.continual.OutputRegularizer(model)
    assert set(reg.shared_names) == {"primary.0.weight", "primary.0.bias", "primary.2.weight", "primary.2.bias"}
    w_before, w_after = _lora_recipe(model, beta=100.0)
    free_before, free_after = _lora_recipe(_lora_model(freeze_base=False), beta=0.0)
    assert _drift(free_before, free_after) > 0.1
    assert _drift(w_before, w_after) < 0.02


def test_shared_parameters_enter_the_penalty_exactly():
    model = _lora_model(shared_A=True)
    reg = hl.continual.OutputRegularizer(model, beta=3.0)
    reg.snapshot()
    assert float(reg.penalty().detach()) == 0.0
    assert model.lora_A is not None
    a = dict(model.lora_A.items())["0.lora_A"]
    with torch.no_grad():
        a.add_(0.5)
    expected = 3.0 * 0.25 * a.numel()
    assert float(reg.penalty().detach()) == pytest.approx(expected, rel=1e-5)
    grads = torch.autograd.grad(reg.penalty(), [a])
    assert torch.allclose(grads[0], torch.full_like(a, 3.0 * 2 * 0.5))


def test_parameters_unfrozen_after_construction_are_refused_by_name():
    model = _lora_model()
    reg = hl.continual.OutputRegularizer(model, beta=1.0)
    reg.snapshot()
    model.primary[2].weight.requires_grad_(True)
    with pytest.raises(hl.HyperloomError, match=re.escape("parameters ['primary.2.weight'] of the model require grad now")):
        reg.penalty()
    with pytest.raises(hl.HyperloomError, match=re.escape("['primary.2.weight']")):
        reg.snapshot()


def test_conditioning_is_validated_at_construction():
    torch.manual_seed(0)
    model = hl.hypernetize(nn.Linear(3, 2), inputs={"task": hl.Task(2), "lam": (0.0, 1.0)}, hidden=(8,))
    with pytest.raises(hl.HyperloomError, match=r"OutputRegularizer: conditioning \{'lam': 5.0\}: .*'lam'"):
        hl.continual.OutputRegularizer(model, conditioning={"lam": 5.0})
    with pytest.raises(hl.HyperloomError, match=r"OutputRegularizer: conditioning \{'lam': 'x'\}"):
        hl.continual.OutputRegularizer(model, conditioning={"lam": "x"})


def test_loading_a_regulariser_or_task_table_of_another_model_is_refused_by_name():
    a = _model(num_tasks=1, max_tasks=4)
    reg = OutputRegularizer(a, beta=1.0)
    reg.snapshot()
    for _ in range(2):
        a.add_task()
        reg.snapshot()
    # 3 snapshots into a regulariser whose model has 1 valid task: loads, but the penalty names the mismatch
    b = _model(num_tasks=1, max_tasks=4)
    rb = OutputRegularizer(b, beta=1.0)
    rb.load_state_dict(reg.state_dict())
    with pytest.raises(hl.HyperloomError, match=re.escape("3 tasks were snapshotted but the model's 'task' has 1 valid task(s)")):
        rb.penalty()
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(rb.penalty(), reg.penalty())
    state = {**reg.state_dict(), "num_snapshots": torch.tensor(9)}
    with pytest.raises(hl.HyperloomError, match=re.escape("num_snapshots is tensor(9), expected an integer in [0, 4]")):
        rb.load_state_dict(state)
    # another max_tasks: torch's raw size mismatch before; the model's Task input also claimed the loaded num_tasks
    big = _model(num_tasks=1, max_tasks=6)
    with pytest.raises(hl.HyperloomError, match=re.escape("targets has shape (4, 67), this regulariser's is (6, 67)")):
        OutputRegularizer(big, beta=1.0).load_state_dict(reg.state_dict())
    with pytest.raises(hl.HyperloomError, match=re.escape("the state's task table has shape (4, 4) (max_tasks=4, dim=4)")):
        big.load_state_dict(a.state_dict())
    assert big.inputs["task"].num_tasks == 1
