"""``cadrelu compare``: every candidate and the ReLU control with one budget, ranked by the mean
delta with an interval paired over samples and seeds; the table says what the JSON says; a
failed arm is shown first and never ranked; gates, resume and usage errors as documented."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

import retrofit.pipeline.compare
import retrofit.training.loop
from retrofit.pipeline.compare import CompareRequest, candidates, compare_file
from retrofit.pipeline.compare_report import COLUMNS, compare_to_dict, compare_to_markdown, print_compare
from retrofit.config import CompetitiveReLUConfig
from retrofit.errors import ExitCode, UsageError
from retrofit.pipeline.options import activation_configs
from retrofit.pipeline.request import DataOptions, RetrofitRequest
from retrofit.evaluation.metrics import paired_delta_ci
from retrofit.training.config import FinetuneConfig
from retrofit.training.results import TrainingDiverged, TrainingInterrupted
from tests.conftest import REPO, SAMPLES, one_line, run_cli

MODEL = SAMPLES / "models" / "digits_mlp.pt2"


@pytest.fixture
def data(tmp_path: Path) -> tuple[Path, Path]:
    """A small slice of the sample digits: (validation, training) .npz files."""
    paths = []
    for name, count in (("val", 120), ("train", 192)):
        source = np.load(SAMPLES / "data" / f"digits_{name}.npz")
        path = tmp_path / f"{name}.npz"
        np.savez(path, x=source["x"][:count], y=source["y"][:count])
        paths.append(path)
    return paths[0], paths[1]


def request(tmp_path: Path, data: tuple[Path, Path], **fields) -> CompareRequest:
    val, train = data
    budget = FinetuneConfig(epochs=fields.pop("epochs", 1), batch_size=32, lr=3e-3,
                            device="cpu")
    job = RetrofitRequest(MODEL, device="cpu", data=DataOptions(val=val, train=train,
                                                                batch_size=32),
                          finetune=budget, **fields.pop("job", {}))
    return CompareRequest(job, out_dir=fields.pop("out_dir", tmp_path / "out"), **fields)


def cli(tmp_path: Path, data: tuple[Path, Path], *extra: object):
    val, train = data
    return run_cli("compare", MODEL, "--data", val, "--finetune", train, "--epochs", 1,
                   "--batch-size", 32, "--lr", 3e-3, "--device", "cpu", "--out-dir",
                   tmp_path / "out", *extra)


def markdown_rows(markdown: str) -> list[list[str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header, *rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert tuple(header) == COLUMNS
    return rows


def expected_row(arm: dict) -> list[str]:
    """A candidate's table row as the JSON gives it."""
    delta = arm["delta"]

    def percent(value):
        return "—" if value is None else f"{value:.2f}%"

    rank = str(arm["rank"]) if arm["rank"] is not None else "failed"
    return [rank, arm["name"], percent(arm["top1_after_swap"]), percent(arm["top1"]),
            f"{delta['delta']:+.2f} pp" if delta else "—",
            f"{delta['ci_low']:+.2f} to {delta['ci_high']:+.2f}" if delta else "—"]


# --------------------------------------------------------------------------- the table


@pytest.fixture
def two_seeds(tmp_path, data):
    return compare_file(request(tmp_path, data, seeds=(0, 1)))


def test_table_rows_equal_the_json_in_markdown_and_in_the_terminal(two_seeds):
    report = json.loads(json.dumps(compare_to_dict(two_seeds), default=str))
    control = ["—", "control (ReLU)", "—", f"{report['control']['top1']:.2f}%", "—", "—"]
    expected = [expected_row(arm) for arm in report["arms"]]
    ranked = [row for row in expected if row[0] != "failed"]
    expected = ranked + [control] + expected[len(ranked):]
    assert markdown_rows(compare_to_markdown(two_seeds)) == expected
    console = Console(record=True, width=60)  # narrower than the table: it must not wrap
    print_compare(two_seeds, console)
    shown = [[cell.strip() for cell in line.strip("│").split("│")]
             for line in console.export_text().splitlines() if line.startswith("│")]
    assert shown == expected


def test_candidates_are_ranked_by_their_mean_delta_against_the_control(two_seeds):
    report = json.loads(json.dumps(compare_to_dict(two_seeds), default=str))
    arms = report["arms"]
    assert [arm["name"] for arm in arms] == report["ranking"]
    assert sorted(report["ranking"]) == sorted(["carelu-energy", "carelu-l1", "carelu-count",
                                                "mrepu"])
    assert [arm["rank"] for arm in arms] == [1, 2, 3, 4]
    deltas = [arm["delta"]["delta"] for arm in arms]
    assert deltas == sorted(deltas, reverse=True)
    control = {run["seed"]: run["top1"] for run in report["control"]["runs"]}
    for arm in arms:
        per_seed = [run["top1"] - control[run["seed"]] for run in arm["runs"]]
        assert [run["delta"] for run in arm["runs"]] == pytest.approx(per_seed, abs=1e-4)
        assert arm["delta"]["delta"] == pytest.approx(np.mean(per_seed), abs=1e-4)
        assert arm["delta"]["ci_low"] <= arm["delta"]["delta"] <= arm["delta"]["ci_high"]
        assert arm["top1"] == pytest.approx(np.mean([run["top1"] for run in arm["runs"]]))
        assert [run["seed"] for run in arm["runs"]] == [0, 1] == report["settings"]["seeds"]
    assert report["before"]["n"] == 120 and report["failed"] == [] and report["failure"] is None
    assert report["gates"] == [] and report["gates_passed"] is True


def test_one_seed_gives_the_paired_interval_over_samples(tmp_path, data):
    report = compare_file(request(tmp_path, data, candidates=candidates({"carelu": CompetitiveReLUConfig()}, ["l1"]),
                                  seeds=(3,)))
    (arm,) = report.arms
    expected = paired_delta_ci(report.control.runs[0].correct, arm.runs[0].correct, seed=3)
    assert (arm.delta.delta, arm.delta.ci_low, arm.delta.ci_high) == (
        expected.delta, expected.ci_low, expected.ci_high)


# --------------------------------------------------------------------------- failures, gates


def diverging(monkeypatch, failing: set[str]) -> None:
    """Candidates named in ``failing`` diverge (as a NaN loss would make them)."""
    real = retrofit.pipeline.compare.finetune_swapped

    def finetune_swapped(opened, request, swapped, config):
        if Path(config.checkpoint).name.rsplit("-seed", 1)[0] in failing:
            raise TrainingDiverged("the training loss became nan at epoch 1, step 1", None)
        return real(opened, request, swapped, config)

    monkeypatch.setattr(retrofit.pipeline.compare, "finetune_swapped", finetune_swapped)


def test_a_failing_arm_is_said_first_is_not_ranked_and_the_others_go_on(tmp_path, data,
                                                                         monkeypatch):
    diverging(monkeypatch, {"carelu-count"})
    result = cli(tmp_path, data, "--to", "carelu", "--markdown", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[0]
    assert first.startswith("FAILED: carelu-count with seed 0: the training loss became nan")
    rows = markdown_rows((tmp_path / "r.md").read_text())
    assert [row[:2] for row in rows] == [["1", rows[0][1]], ["2", rows[1][1]],
                                         ["—", "control (ReLU)"], ["failed", "carelu-count"]]
    assert "**FAILED: carelu-count" in (tmp_path / "r.md").read_text().splitlines()[2]
    report = json.loads(cli(tmp_path, data, "--to", "carelu", "--resume", "--json").stdout)
    assert report["failed"] == [{"arm": "carelu-count", "seed": 0, "exit_code": 3,
                                 "reason": "the training loss became nan at epoch 1, step 1"}]
    assert "carelu-count" not in report["ranking"] and len(report["ranking"]) == 2
    failed = report["arms"][-1]
    assert failed["name"] == "carelu-count" and failed["rank"] is None
    assert failed["delta"] is None and failed["failure"].startswith("seed 0: the training loss")
    assert report["recorded_runs"] == 4  # the failure was recorded too: resume does not retry


def test_when_every_candidate_fails_the_first_failure_gives_the_exit_code(tmp_path, data,
                                                                          monkeypatch):
    diverging(monkeypatch, {"carelu-l1", "mrepu"})
    result = cli(tmp_path, data, "--measures", "l1")
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert one_line(result) == ("error: every candidate failed; the first, carelu-l1 with seed "
                                "0: the training loss became nan at epoch 1, step 1")
    assert result.stdout.startswith("FAILED: carelu-l1 with seed 0")


def test_a_diverged_control_is_recorded_and_leaves_nothing_to_rank(tmp_path, data, monkeypatch):
    def finetune_control(opened, request, report, config):
        raise TrainingDiverged("the training loss became nan at epoch 1, step 2", None)

    monkeypatch.setattr(retrofit.pipeline.compare, "finetune_control", finetune_control)
    result = cli(tmp_path, data, "--to", "carelu", "--measures", "l1")
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert one_line(result) == ("error: the ReLU control failed with seed 0 (the training loss "
                                "became nan at epoch 1, step 2): no candidate can be compared "
                                "with it")


def test_gates_apply_to_the_top_ranked_candidate_and_fail_with_5(tmp_path, data):
    result = cli(tmp_path, data, "--to", "carelu", "--measures", "l1", "--min-gain", 1000,
                 "--max-drop", 100, "--json")
    assert result.exit_code == ExitCode.GATE, result.output
    assert one_line(result) == "error: gate failed: min_gain (on carelu-l1)"
    report = json.loads(result.stdout)  # the report comes first, whole
    gain = report["arms"][0]["top1"] - report["before"]["top1"]
    assert report["gated_arm"] == "carelu-l1" and report["gates_passed"] is False
    assert [(g["name"], g["passed"]) for g in report["gates"]] == [("max_drop", True),
                                                                    ("min_gain", False)]
    assert report["gates"][1]["value"] == pytest.approx(gain)


# --------------------------------------------------------------------------- resume


def test_resume_reads_back_finished_runs_and_continues_the_interrupted_one(tmp_path, data,
                                                                          monkeypatch):
    arms = candidates({"carelu": CompetitiveReLUConfig()}, ["energy", "l1"])
    straight = compare_file(request(tmp_path, data, candidates=arms, epochs=2,
                                    out_dir=tmp_path / "straight"))
    real = retrofit.training.loop.finetune
    calls: list[str] = []

    def finetune(model, train, val, config, **kwargs):
        calls.append(Path(config.checkpoint).name)
        if config.checkpoint.name == "carelu-l1-seed0.ckpt" and not config.resume:
            def stop(record):
                raise KeyboardInterrupt

            kwargs["on_epoch"] = stop  # Ctrl-C at the end of epoch 1 of 2
        return real(model, train, val, config, **kwargs)

    monkeypatch.setattr(retrofit.training.loop, "finetune", finetune)
    interrupted = request(tmp_path, data, candidates=arms, epochs=2)
    with pytest.raises(TrainingInterrupted) as caught:
        compare_file(interrupted)
    folder = tmp_path / "out"
    assert caught.value.checkpoint == folder / "carelu-l1-seed0.ckpt"
    state = json.loads((folder / "state.json").read_text())
    assert sorted(state["runs"]) == ["carelu-energy-seed0", "control-seed0"]
    assert sorted(path.name for path in folder.iterdir()) == ["carelu-l1-seed0.ckpt",
                                                              "state.json"]
    calls.clear()
    resumed = compare_file(replace(interrupted, resume=True))
    assert calls == ["carelu-l1-seed0.ckpt"]  # the finished runs were not trained again
    assert resumed.recorded_runs == 2 and resumed.control.runs[0].recorded
    assert next(arm for arm in resumed.arms if arm.name == "carelu-energy").runs[0].recorded
    l1 = next(arm for arm in resumed.arms if arm.name == "carelu-l1")
    assert l1.runs[0].resumed and not l1.runs[0].recorded
    assert sorted(path.name for path in folder.iterdir()) == ["state.json"]
    for mine, theirs in zip([resumed.control, *resumed.arms], [straight.control, *straight.arms]):
        assert mine.name == theirs.name and mine.rank == theirs.rank
        assert mine.runs[0].top1 == theirs.runs[0].top1
        assert mine.runs[0].correct.tolist() == theirs.runs[0].correct.tolist()
    calls.clear()
    again = compare_file(replace(interrupted, resume=True, seeds=(0, 1)))  # a seed added
    assert calls == ["control-seed1.ckpt", "carelu-energy-seed1.ckpt", "carelu-l1-seed1.ckpt"]
    assert again.recorded_runs == 3 and again.arms[0].delta.seeds == 2


def test_ctrl_c_during_an_arm_is_one_line_naming_its_checkpoint_and_exit_130(tmp_path, data,
                                                                            monkeypatch):
    real = retrofit.training.loop.finetune

    def finetune(model, train, val, config, **kwargs):
        def stop(record):
            raise KeyboardInterrupt

        return real(model, train, val, config, **kwargs, on_epoch=stop)

    monkeypatch.setattr(retrofit.training.loop, "finetune", finetune)
    result = cli(tmp_path, data, "--to", "mrepu")
    checkpoint = tmp_path / "out" / "control-seed0.ckpt"
    assert result.exit_code == ExitCode.INTERRUPTED, result.output
    assert one_line(result) == (f"interrupted; {checkpoint} was saved: run the same command "
                                "with --resume to go on")
    assert result.stdout == "" and checkpoint.exists()


def test_an_earlier_comparison_needs_resume_or_force_and_resume_the_same_settings(tmp_path,
                                                                                 data):
    narrow = ("--to", "carelu", "--measures", "l1")
    assert cli(tmp_path, data, *narrow).exit_code == 0
    again = cli(tmp_path, data, *narrow)
    assert again.exit_code == ExitCode.OUTPUT
    assert "holds an earlier comparison (state.json)" in one_line(again)
    other = cli(tmp_path, data, *narrow, "--resume", "--lr", 1e-3)
    assert other.exit_code == ExitCode.USAGE and "finetune differ" in one_line(other)
    assert cli(tmp_path, data, *narrow, "--force").exit_code == 0


# --------------------------------------------------------------------------- options


def test_to_and_measures_narrow_the_arms_to_the_control_and_one_candidate(tmp_path, data):
    result = cli(tmp_path, data, "--to", "carelu", "--measures", "l1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [arm["name"] for arm in report["arms"]] == ["carelu-l1"]
    assert report["arms"][0]["config"]["measure"] == "l1"
    assert sorted(json.loads((tmp_path / "out" / "state.json").read_text())["runs"]) == [
        "carelu-l1-seed0", "control-seed0"]


def test_candidates_take_the_activation_options_each_belongs_to():
    found = candidates(activation_configs(["carelu", "mrepu"], {"k": 3.0, "p": 3.0}), ["count"])
    assert [(c.name, c.config.name) for c in found] == [("carelu-count", "carelu"),
                                                         ("mrepu", "mrepu")]
    assert (found[0].config.k, found[0].config.measure, found[1].config.p) == (3.0, "count", 3.0)
    assert found[1].config.calibrate
    assert [c.name for c in candidates()] == ["carelu-energy", "carelu-l1", "carelu-count",
                                              "mrepu"]


@pytest.mark.parametrize("extra, says", [
    ((), "pass --finetune TRAIN"),
    (("--finetune", "t.npz", "--to", "relu6"), "--to takes carelu and mrepu"),
    (("--finetune", "t.npz", "--to", "mrepu", "--measures", "l1"), "--measures applies to"),
    (("--finetune", "t.npz", "--measures", "l2"), "--measures takes energy, l1, count"),
    (("--finetune", "t.npz", "--to", "mrepu", "--k", "3"), "--k applies to --to carelu"),
    (("--finetune", "t.npz", "--seeds", "0,0"), "lists a seed twice"),
    (("--finetune", "t.npz", "--seeds", "x"), "--seeds takes whole numbers"),
], ids=["no fine-tune", "unknown activation", "measures without carelu", "unknown measure",
        "k without carelu", "seed twice", "seed not a number"])
def test_usage_errors_are_one_line_and_exit_2(extra, says):
    result = run_cli("compare", MODEL, "--data", "v.npz", *extra)
    assert result.exit_code == ExitCode.USAGE, result.output
    assert says in one_line(result)


def test_the_library_refuses_a_comparison_without_fine_tuning():
    with pytest.raises(UsageError, match="--finetune"):
        CompareRequest(RetrofitRequest(MODEL))


def test_plot_and_step_summary_are_written(tmp_path, data, monkeypatch):
    pytest.importorskip("matplotlib")
    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    result = cli(tmp_path, data, "--to", "carelu", "--measures", "l1,count", "--plot",
                 tmp_path / "plot.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {tmp_path / 'plot.png'}" in result.stdout
    assert summary.read_text().startswith("### cadrelu compare: `digits_mlp.pt2`")


# --------------------------------------------------------------------------- processes


@pytest.mark.slow
def test_two_workers_run_every_arm_and_rank_0_alone_reports(tmp_path, data):
    val, train = data
    done = subprocess.run(
        [sys.executable, "-m", "cadrelu", "compare", str(MODEL), "--data", str(val), "--finetune",
         str(train), "--epochs", "1", "--batch-size", "16", "--device", "cpu", "--to",
         "carelu", "--measures", "l1", "--seeds", "0,1", "--out-dir", str(tmp_path / "out"),
         "--nproc-per-node", "2", "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)  # one report: rank 0's
    assert report["settings"]["world_size"] == 2 and report["ranking"] == ["carelu-l1"]
    state = json.loads((tmp_path / "out" / "state.json").read_text())
    assert sorted(state["runs"]) == ["carelu-l1-seed0", "carelu-l1-seed1", "control-seed0",
                                     "control-seed1"]
    assert not re.search(r"error|Traceback", done.stderr)


def test_readme_documents_every_json_key(two_seeds):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Which activation helps my model?"):]
    section = section[:section.index("\n## ", 1)]
    documented = set()
    for row in section.splitlines():
        if row.startswith("| `"):
            documented |= {part.strip("` ") for part in row.split("|")[1].split(",")}
    report = compare_to_dict(two_seeds)
    assert documented == set(report) | set(report["arms"][0]) | set(report["arms"][0]["runs"][0])
