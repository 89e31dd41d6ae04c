"""retrofit.training.loop: fine-tuning learns, NaN and Ctrl-C leave a usable state, resume is
exact, torch.export modules train, N processes equal one with N x the batch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from retrofit.activations.modules import CompetitiveReLU
from retrofit.config import CompetitiveReLUConfig
from retrofit.errors import BadInputError, ExitCode, RetrofitError, UsageError
from retrofit.evaluation.datasets.base import TensorClassificationData
from retrofit.evaluation.evaluate import evaluate, torch_predictor
from retrofit.training.checkpoint import CHECKPOINT_FORMAT
from retrofit.training.config import FinetuneConfig
from retrofit.training.loop import finetune
from retrofit.training.results import TrainingDiverged, TrainingInterrupted
from tests.conftest import REPO, no_partial_files
from tests.training.conftest import TRAIN, VAL, assert_same_weights, config, conv_net


# --------------------------------------------------------------------------- learning


def test_finetuning_a_random_conv_net_raises_validation_accuracy_and_keeps_the_input():
    model = conv_net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = finetune(model, TRAIN, VAL, config(epochs=4))
    assert result.start_val_top1 is not None and result.best_val_top1 is not None
    assert result.best_val_top1 >= result.start_val_top1 + 15
    assert len(result.history) == 4 and result.stopped_early is None and not result.interrupted
    assert result.best_val_top1 == max(r.val_top1 for r in result.history)
    again = evaluate(torch_predictor(result.model), VAL)
    assert again.top1 == result.best_val_top1  # the returned weights are the best epoch's
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])  # fine-tuning worked on a copy


def test_the_same_seed_gives_the_same_weights_so_a_control_run_is_comparable():
    a = finetune(conv_net(dropout=0.2), TRAIN, VAL, config(seed=5)).model
    b = finetune(conv_net(dropout=0.2), TRAIN, VAL, config(seed=5)).model
    c = finetune(conv_net(dropout=0.2), TRAIN, VAL, config(seed=6)).model
    assert_same_weights(a, b, atol=0)
    assert not torch.equal(a[-1].weight, c[-1].weight)


def test_deterministic_and_bf16_runs_train_and_give_the_global_settings_back():
    result = finetune(conv_net(), TRAIN, VAL, config(deterministic=True, amp="bf16"))
    assert result.best_val_top1 > result.start_val_top1
    assert not torch.are_deterministic_algorithms_enabled()


def test_labels_or_samples_that_do_not_fit_the_model_are_one_clear_error():
    wide = TensorClassificationData(TRAIN.x, TRAIN.y * 2, source="wide.npz", preprocessing={})
    with pytest.raises(BadInputError, match="labels in wide.npz go up to 2 but the model has 2"):
        finetune(conv_net(), wide, None, config())
    flat = TensorClassificationData(TRAIN.x.flatten(1), TRAIN.y, source="flat", preprocessing={})
    with pytest.raises(BadInputError, match=r"data samples of shape \(36,\) do not fit"):
        finetune(conv_net(), flat, None, config())


class FailsAtTheSecondStep(nn.Module):
    """Takes the first batch, then refuses one as an embedding refuses an id beyond its table."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(36, 2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 2:
            raise IndexError("index out of range in self")
        return self.linear(x.flatten(1))


def test_a_batch_the_model_refuses_after_the_first_is_one_clear_error_too():
    """Training calls the model as evaluation does (BatchLogits): every batch, not only the
    first, that the model refuses is a one-line BadInputError rather than a traceback."""
    with pytest.raises(BadInputError, match=r"samples of shape \(1, 6, 6\) do not fit the model: "
                                            "index out of range in self"):
        finetune(FailsAtTheSecondStep(), TRAIN, None, config(epochs=1))


def test_activation_values_are_recorded_per_site_every_epoch():
    result = finetune(conv_net(), TRAIN, VAL, config())
    alphas = [r.activations["1"]["alpha"] for r in result.history]
    assert alphas[result.best_epoch - 1] == result.model[1].alpha.item()
    assert len(set(alphas)) == len(alphas)  # moved every epoch
    assert set(result.history[0].activations["1"]) == {"alpha", "beta"}


# --------------------------------------------------------------------------- divergence


class Switchable(Dataset):
    """Wraps a dataset; once ``poison`` is set every sample is NaN."""

    def __init__(self, base: Dataset) -> None:
        self.base, self.poison = base, False

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int):
        x, y = self.base[index]
        return (x * float("nan") if self.poison else x), y


def test_nan_loss_raises_a_project_error_and_keeps_the_best_weights(tmp_path):
    data = Switchable(TRAIN)
    path = tmp_path / "run.ckpt"

    def poison_after_first(record):
        data.poison = True

    with pytest.raises(TrainingDiverged, match="NaN or infinite at epoch 2") as caught:
        finetune(conv_net(), data, VAL, config(epochs=3, checkpoint=path),
                 on_epoch=poison_after_first)
    error = caught.value
    assert isinstance(error, RetrofitError) and error.exit_code == ExitCode.BAD_INPUT
    assert "kept the weights of epoch 1" in str(error)
    result = error.result
    assert result.best_epoch == 1 and result.stopped_early and len(result.history) == 1
    saved = torch.load(path, weights_only=True)
    assert saved["epoch"] == 1  # the diverged state was not written
    for key, value in result.model.state_dict().items():
        assert torch.isfinite(value).all()
        assert torch.equal(value, saved["best"]["state"][key])


# --------------------------------------------------------------------------- checkpoints


def test_interrupt_at_epoch_end_then_resume_matches_an_uninterrupted_run(tmp_path):
    cfg = config(checkpoint=tmp_path / "a.ckpt")
    straight = finetune(conv_net(dropout=0.3), TRAIN, VAL, cfg)

    def interrupt(record):
        raise KeyboardInterrupt

    cfg = config(checkpoint=tmp_path / "b.ckpt")
    with pytest.raises(KeyboardInterrupt) as caught:
        finetune(conv_net(dropout=0.3), TRAIN, VAL, cfg, on_epoch=interrupt)
    assert isinstance(caught.value, TrainingInterrupted)
    assert caught.value.checkpoint == tmp_path / "b.ckpt" and caught.value.result.interrupted
    state = torch.load(tmp_path / "b.ckpt", weights_only=True)
    assert state["format"] == CHECKPOINT_FORMAT and state["epoch"] == 1
    resumed = finetune(conv_net(dropout=0.3), TRAIN, VAL, config(checkpoint=tmp_path / "b.ckpt",
                                                                  resume=True))
    assert_same_weights(resumed.model, straight.model)
    assert [r.val_top1 for r in resumed.history] == [r.val_top1 for r in straight.history]
    assert resumed.best_epoch == straight.best_epoch
    assert no_partial_files(tmp_path)


def test_sigterm_mid_epoch_checkpoints_the_last_step_and_resume_is_exact(tmp_path):
    straight = finetune(conv_net(dropout=0.3), TRAIN, VAL, config())

    class TermAtFetch(Dataset):
        """Sends SIGTERM to this process while loading step 2's batch, once."""

        def __init__(self) -> None:
            self.fetches = 0

        def __len__(self) -> int:
            return len(TRAIN)

        def __getitem__(self, index: int):
            self.fetches += 1
            if self.fetches == 40:
                os.kill(os.getpid(), signal.SIGTERM)
            return TRAIN[index]

    def outside_finetune(signum, frame):  # if finetune's handler were missing, fail, not die
        raise AssertionError("SIGTERM reached the default handler")

    previous = signal.signal(signal.SIGTERM, outside_finetune)
    path = tmp_path / "run.ckpt"
    try:
        with pytest.raises(TrainingInterrupted) as caught:
            finetune(conv_net(dropout=0.3), TermAtFetch(), VAL, config(checkpoint=path))
        assert signal.getsignal(signal.SIGTERM) is outside_finetune  # handler given back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert caught.value.result.steps == 2 and "epoch 1, step 2" in str(caught.value)
    state = torch.load(path, weights_only=True)
    assert (state["epoch"], state["batch_in_epoch"], state["schedule"]["step"]) == (0, 2, 2)
    resumed = finetune(conv_net(dropout=0.3), TRAIN, VAL, config(checkpoint=path, resume=True))
    assert_same_weights(resumed.model, straight.model)
    assert resumed.history[0].train_loss == pytest.approx(straight.history[0].train_loss)
    assert no_partial_files(tmp_path)


# --------------------------------------------------------------------------- torch.export


def test_torch_export_modules_fine_tune_in_their_exported_mode():
    from retrofit.torch_path.rewrite import retrofit_torch_model

    relu_net = conv_net(nn.ReLU()).eval()
    batch = torch.export.Dim("batch", min=2)
    program = torch.export.export(relu_net, (TRAIN.x[:4],), dynamic_shapes=({0: batch},))
    exported = program.module()
    with pytest.raises(NotImplementedError):
        exported.train()
    plain = finetune(exported, TRAIN, VAL, config())
    assert len(plain.history) == 2 and plain.best_val_top1 > plain.start_val_top1
    assert any("torch.export" in note for note in plain.notes)

    retrofitted = retrofit_torch_model(program.module(), CompetitiveReLUConfig()).model
    result = finetune(retrofitted, TRAIN, VAL, config())
    carelus = [m for m in result.model.modules() if isinstance(m, CompetitiveReLU)]
    assert carelus and carelus[0].alpha.item() != 0.0
    assert any("torch.export" in note for note in result.notes)


def test_validation_leaves_the_batchnorm_statistics_of_a_training_mode_export_alone():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Flatten(), nn.Linear(144, 2)).train()
    batch = torch.export.Dim("batch", min=2)
    exported = torch.export.export(net, (TRAIN.x[:4],), dynamic_shapes=({0: batch},)).module()
    # lr 0 changes no weight, so only the training batches may move the running statistics.
    frozen = config(epochs=1, batch_size=256, lr=1e-9, activation_lr=0.0, weight_decay=0.0)
    with_val = finetune(exported, TRAIN, VAL, frozen).model.state_dict()
    without = finetune(exported, TRAIN, None, frozen).model.state_dict()
    for key in ("1.running_mean", "1.running_var"):
        assert torch.equal(with_val[key], without[key]), key


# --------------------------------------------------------------------------- several processes


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_twice_the_batch(tmp_path):
    from tests.ddp_worker import BATCH_PER_PROCESS, CONFIG, tiny_problem

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    # --standalone: a c10d rendezvous on localhost:0, i.e. a free port the launcher holds
    # (probing for a free port and handing it over races with other processes).
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--standalone", str(REPO / "tests" / "ddp_worker.py"), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]

    model, train, val = tiny_problem()
    single = finetune(model, train, val, FinetuneConfig(batch_size=2 * BATCH_PER_PROCESS,
                                                        **CONFIG), progress=False)
    moved = max((v - model.state_dict()[k]).abs().max().item()
                for k, v in single.model.state_dict().items())
    assert moved > 1e-2  # training did change the weights, so equality below means something
    for rank in (0, 1):
        weights = torch.load(tmp_path / f"weights-rank{rank}.pt", weights_only=True)
        for key, value in single.model.state_dict().items():
            torch.testing.assert_close(weights[key], value, atol=1e-5, rtol=0, msg=key)
        summary = torch.load(tmp_path / f"result-rank{rank}.pt", weights_only=True)
        assert summary["best_epoch"] == single.best_epoch
    written = (tmp_path / "writes-rank0.txt").read_text().split()
    assert written == [str(tmp_path / "checkpoint.pt")] * 2  # one checkpoint per epoch
    assert not (tmp_path / "writes-rank1.txt").exists()
    assert no_partial_files(tmp_path)


# --------------------------------------------------------------------------- plot


def test_training_plot_is_a_png_written_atomically(tmp_path):
    pytest.importorskip("matplotlib")
    from retrofit.pipeline.plots import save_training_plot

    result = finetune(conv_net(), TRAIN, VAL, config())
    path = save_training_plot(result.history, tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert no_partial_files(tmp_path)


def test_training_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    from retrofit.pipeline.plots import save_training_plot

    result = finetune(conv_net(), TRAIN, None, config(epochs=1))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(UsageError, match=r"pip install 'cadrelu\[plot\]'"):
        save_training_plot(result.history, tmp_path / "curves.png")
    assert not list(tmp_path.iterdir())
