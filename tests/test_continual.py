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
    assert model.primary[2].weight.grad is None and model.primary[2].bias.grad is None  # not predicted: untouched
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
    assert set(state) == {"targets", "num_snapshots", "_extra_state"}
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
