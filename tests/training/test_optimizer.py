"""retrofit.training.optimizer: activation parameters have their own group and learning rate,
and no weight decay."""

from __future__ import annotations

import torch

from retrofit.training.loop import finetune
from retrofit.training.optimizer import parameter_groups
from tests.training.conftest import TRAIN, config, conv_net


def test_activation_parameters_form_their_own_group_at_their_own_lr_without_weight_decay():
    model = conv_net()
    groups = {g["name"]: g for g in parameter_groups(model, config(weight_decay=0.1))}
    assert {id(p) for p in groups["activation"]["params"]} == {
        id(model[1].alpha), id(model[1].beta)
    }
    assert (groups["activation"]["lr"], groups["activation"]["weight_decay"]) == (2e-2, 0.0)
    assert groups["weights"]["weight_decay"] == 0.1 and groups["weights"]["lr"] == 1e-2
    assert all(p.ndim >= 2 for p in groups["weights"]["params"])
    assert groups["no_decay"]["weight_decay"] == 0.0  # biases
    assert all(p.ndim <= 1 for p in groups["no_decay"]["params"])


def test_alpha_and_beta_move_at_the_activation_lr_and_stay_put_at_zero():
    start = conv_net()[1]
    moved = finetune(conv_net(), TRAIN, None, config()).model[1]
    assert abs(moved.alpha.item() - start.alpha.item()) > 1e-3
    assert abs(moved.beta.item() - start.beta.item()) > 1e-3
    frozen = finetune(conv_net(), TRAIN, None, config(activation_lr=0.0, weight_decay=0.5)).model
    assert frozen[1].alpha.item() == start.alpha.item()  # lr 0 and no decay: exactly unchanged
    assert frozen[1].beta.item() == start.beta.item()
    assert not torch.equal(frozen[0].weight, conv_net()[0].weight)
