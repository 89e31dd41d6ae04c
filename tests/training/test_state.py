"""retrofit.training.state: a checkpoint is resumed only with what wrote it, and says where the
run stood."""

from __future__ import annotations

import pytest

from retrofit.errors import BadInputError, UsageError
from retrofit.training.loop import finetune
from retrofit.training.state import RunState
from tests.training.conftest import TRAIN, config, conv_net, separable


def test_an_existing_checkpoint_needs_resume_and_resume_needs_the_same_settings(tmp_path):
    path = tmp_path / "run.ckpt"
    finetune(conv_net(), TRAIN, None, config(epochs=1, checkpoint=path))
    with pytest.raises(UsageError, match="already exists"):
        finetune(conv_net(), TRAIN, None, config(epochs=1, checkpoint=path))
    with pytest.raises(UsageError, match="lr 0.01 -> 0.02"):
        finetune(conv_net(), TRAIN, None, config(epochs=1, lr=2e-2, checkpoint=path, resume=True))
    with pytest.raises(UsageError, match="no checkpoint"):
        finetune(conv_net(), TRAIN, None, config(checkpoint=tmp_path / "x.ckpt", resume=True))
    done = finetune(conv_net(), TRAIN, None, config(epochs=1, checkpoint=path, resume=True))
    assert done.steps == done.total_steps and len(done.history) == 1  # finished: nothing to do


def test_a_checkpoint_resumes_only_on_the_training_set_that_wrote_it(tmp_path):
    path = tmp_path / "run.ckpt"
    finetune(conv_net(), TRAIN, None, config(epochs=1, checkpoint=path))
    with pytest.raises(BadInputError, match="for a training set of 192 samples, this one has 96"):
        finetune(conv_net(), separable(96, seed=1), None, config(epochs=1, checkpoint=path,
                                                                 resume=True))


def test_the_position_names_the_step_within_an_epoch_or_the_epoch_end():
    assert RunState().position() == "before the first step"
    assert RunState(step=6, epoch=2).position() == "at the end of epoch 2"
    assert RunState(step=8, epoch=2, batch_in_epoch=2).position() == "at epoch 3, step 8"
