"""retrofit.training.loop: fine-tuning learns, schedules hit their values, NaN and Ctrl-C leave a usable
state, resume is exact, torch.export modules train, N processes equal one with N x the batch."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from retrofit.activations.modules import CompetitiveReLU, MRePU
from retrofit.training.checkpoint import CHECKPOINT_FORMAT
from retrofit.config import CompetitiveReLUConfig
from retrofit.evaluation.datasets.base import TensorClassificationData
from retrofit.training.distributed import epoch_batches
from retrofit.errors import BadInputError, ExitCode, RetrofitError, UsageError
from retrofit.evaluation.evaluate import evaluate, torch_predictor
from retrofit.training.loop import (
    FinetuneConfig,
    TrainingDiverged,
    TrainingInterrupted,
    blend_at,
    finetune,
    parameter_groups,
    warmup_cosine,
)
from tests.conftest import REPO, no_partial_files

pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


def separable(n: int, seed: int = 0) -> TensorClassificationData:
    """Two classes of 1x6x6 images: is the left half brighter than the right half?"""
    x = torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed))
    y = (x[..., :3].mean((1, 2, 3)) > x[..., 3:].mean((1, 2, 3))).long()
    return TensorClassificationData(x, y, source=f"synthetic-{seed}", preprocessing={})


TRAIN = separable(192, seed=1)
VAL = separable(64, seed=2)


def conv_net(activation: nn.Module | None = None, *, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        activation if activation is not None else CompetitiveReLU(),
        nn.Dropout(dropout),
        nn.Flatten(),
        nn.Linear(144, 2),
    )


def config(**changes) -> FinetuneConfig:
    settings = dict(epochs=2, batch_size=32, lr=1e-2, activation_lr=2e-2, device="cpu")
    return FinetuneConfig(**{**settings, **changes})


def assert_same_weights(a: nn.Module, b: nn.Module, atol: float = 1e-6) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=atol, rtol=0, msg=key)


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


# --------------------------------------------------------------------------- parameters


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


def test_activation_values_are_recorded_per_site_every_epoch():
    result = finetune(conv_net(), TRAIN, VAL, config())
    alphas = [r.activations["1"]["alpha"] for r in result.history]
    assert alphas[result.best_epoch - 1] == result.model[1].alpha.item()
    assert len(set(alphas)) == len(alphas)  # moved every epoch
    assert set(result.history[0].activations["1"]) == {"alpha", "beta"}


# --------------------------------------------------------------------------- schedules


def test_warmup_then_cosine_lr_at_chosen_steps():
    assert warmup_cosine(0, 10, 2) == pytest.approx(0.5)
    assert warmup_cosine(1, 10, 2) == pytest.approx(1.0)
    assert warmup_cosine(2, 10, 2) == pytest.approx(1.0)
    assert warmup_cosine(6, 10, 2) == pytest.approx(0.5)
    assert warmup_cosine(9, 10, 2) == pytest.approx(0.5 * (1 + math.cos(7 / 8 * math.pi)))
    assert warmup_cosine(0, 10, 0) == pytest.approx(1.0)


def test_optimizer_uses_the_scheduled_lr_in_every_group(monkeypatch):
    used: list[dict[str, float]] = []
    step = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        used.append({g["name"]: (g["lr"], g["weight_decay"]) for g in self.param_groups})
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    # One step per epoch: 5 steps, 2 of warm-up.
    result = finetune(conv_net(), TRAIN, None, config(epochs=5, batch_size=256,
                                                       warmup_fraction=0.4, weight_decay=0.1))
    factors = [0.5, 1.0, 1.0, 0.75, 0.25]
    assert [u["weights"][0] for u in used] == pytest.approx([1e-2 * f for f in factors])
    assert [u["activation"][0] for u in used] == pytest.approx([2e-2 * f for f in factors])
    assert {u["weights"][1] for u in used} == {0.1}
    assert {u["activation"][1] for u in used} == {0.0}
    assert [r.lr for r in result.history] == pytest.approx([1e-2 * f for f in factors])


def test_mrepu_blend_ramps_from_relu_to_mrepu_and_ends_at_one(monkeypatch):
    seen: list[float] = []
    forward = MRePU.forward

    def spy(self, x):
        if torch.is_grad_enabled():  # training steps, not validation
            seen.append(self.blend)
        return forward(self, x)

    monkeypatch.setattr(MRePU, "forward", spy)
    result = finetune(conv_net(MRePU()), TRAIN, VAL,
                      config(epochs=8, batch_size=256, blend_ramp_fraction=0.5, lr=1e-3))
    assert seen == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0])
    assert [r.blend for r in result.history] == pytest.approx([0.25, 0.5, 0.75] + [1.0] * 5)
    assert result.model[1].blend == 1.0 and result.ramp_finished
    assert result.best_epoch >= 4  # epochs validated at lam < 1 cannot be the best


def test_mrepu_ramp_defaults_to_the_activation_config_and_an_early_stop_says_so():
    blends = []

    def stop_after_first(record):
        blends.append(record.blend)
        raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted) as caught:
        finetune(conv_net(MRePU(ramp_fraction=0.25)), TRAIN, VAL,
                 config(epochs=8, batch_size=256, lr=1e-3), on_epoch=stop_after_first)
    assert blends == [0.5]  # 8 steps, ramp 2 steps: lam 1/2 after the first
    result = caught.value.result
    assert not result.ramp_finished and result.model[1].blend == 1.0
    assert any("ramp" in note for note in result.notes)


def test_blend_at_is_zero_first_then_linear_then_one():
    assert [blend_at(s, 4) for s in (0, 2, 4, 9)] == [0.0, 0.5, 1.0, 1.0]
    assert blend_at(0, 0) == 1.0  # no ramp: MRePU from the start


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


def test_each_process_takes_a_contiguous_slice_of_the_single_process_batch():
    for n in (32, 33, 37):  # full batches, a short last one, one smaller than the process count
        single = epoch_batches(n, 8, seed=4, epoch=2)
        ranks = [epoch_batches(n, 2, seed=4, epoch=2, rank=r, world_size=4) for r in range(4)]
        assert len(single) == len(ranks[0])
        for k, whole in enumerate(single):
            parts = [ranks[r][k] for r in range(4)]
            assert [i for p in parts for i in p.indices[: p.real]] == whole.indices
            assert {p.global_size for p in parts} == {whole.global_size}
    assert epoch_batches(10, 4, seed=0, epoch=1)[0].indices != epoch_batches(
        10, 4, seed=0, epoch=2)[0].indices


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
    path = save_training_plot(result.history, tmp_path / "curves.png",
                              start_val_top1=result.start_val_top1)
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
