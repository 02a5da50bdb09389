import re

import pytest
import torch
from torch import nn

from hyperloom import HyperloomError, select_parameters


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.enc(x).mean((2, 3)))


def test_by_type():
    assert select_parameters(Net(), [nn.Conv2d]) == ["enc.0.weight", "enc.0.bias", "enc.2.weight", "enc.2.bias"]


def test_by_exact_param_and_module_name():
    assert select_parameters(Net(), "head.weight") == ["head.weight"]
    assert select_parameters(Net(), ["enc.1"]) == ["enc.1.weight", "enc.1.bias"]


def test_by_glob_and_regex():
    assert select_parameters(Net(), "enc.*.weight") == ["enc.0.weight", "enc.1.weight", "enc.2.weight"]
    assert select_parameters(Net(), re.compile(r"enc\.[02]\.bias")) == ["enc.0.bias", "enc.2.bias"]


def test_none_selects_everything_in_order():
    net = Net()
    assert select_parameters(net) == [n for n, _ in net.named_parameters()]


def test_matching_nothing_lists_names_and_types():
    with pytest.raises(HyperloomError) as e:
        select_parameters(Net(), [nn.Conv2d, nn.LSTM])
    msg = str(e.value)
    assert msg.startswith("predict selector LSTM matched no parameter; parameter names: ['enc.0.weight'")
    assert "module types with parameters: ['BatchNorm2d', 'Conv2d', 'Linear']" in msg


def test_selected_twice():
    with pytest.raises(HyperloomError, match=re.escape("Parameter 'enc.0.weight' is selected twice: by Conv2d and by 'enc.0.weight'")):
        select_parameters(Net(), [nn.Conv2d, "enc.0.weight"])


def test_tied_parameters_refused():
    net = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    net[1].weight = net[0].weight
    with pytest.raises(HyperloomError, match=re.escape("Parameter '0.weight' is tied to ['0.weight', '1.weight']")):
        select_parameters(net, "0.weight")


def test_bad_selector_type_and_empty_list():
    with pytest.raises(HyperloomError, match=re.escape("Unsupported predict selector 3")):
        select_parameters(Net(), [3])
    with pytest.raises(HyperloomError, match=re.escape("predict is an empty list")):
        select_parameters(Net(), [])


def test_model_without_parameters():
    with pytest.raises(HyperloomError, match=re.escape("The model ReLU has no parameters to predict")):
        select_parameters(nn.ReLU())


def test_uninitialised_lazy_parameter():
    net = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(HyperloomError, match=re.escape("Parameter '0.weight' is uninitialised (lazy module)")):
        select_parameters(net, "0.weight")
    net(torch.zeros(1, 2))
    assert select_parameters(net, "0.weight") == ["0.weight"]


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.out = nn.Linear(4, 10, bias=False)
        self.out.weight = self.emb.weight  # tied, as language models tie their output layer to the embedding

    def forward(self, x):
        return self.out(self.emb(x))


@pytest.mark.parametrize("predict", [[nn.Linear], "out.weight", "out", "out.*", re.compile(r"out\..*"), None])
def test_tied_second_owner_is_refused_naming_both(predict):
    # by type this used to select nothing (then IndexError), by name it said "matched no parameter"
    with pytest.raises(HyperloomError, match=re.escape("is tied to ['emb.weight', 'out.weight']: tied parameters cannot be predicted")):
        select_parameters(TiedLM(), predict)


def test_tied_first_owner_is_refused_and_untied_ones_pass():
    with pytest.raises(HyperloomError, match=re.escape("Parameter 'emb.weight' is tied to ['emb.weight', 'out.weight']")):
        select_parameters(TiedLM(), [nn.Embedding])
    net = TiedLM()
    net.out.bias = nn.Parameter(torch.zeros(10))
    assert select_parameters(net, "out.bias") == ["out.bias"]


def test_a_buffer_name_says_buffers_cannot_be_predicted():
    # used to say only "matched no parameter"
    net = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    for sel in ("1.running_mean", "1.running_*", re.compile(r"1\.running_.*")):
        with pytest.raises(HyperloomError, match=re.escape("matches buffer(s) ['1.running_mean'")):
            select_parameters(net, sel)
    with pytest.raises(HyperloomError, match=re.escape("buffers (running statistics, masks, position ids) are not trained")):
        select_parameters(net, "1.num_batches_tracked")
