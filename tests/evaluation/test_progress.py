"""retrofit.evaluation.progress: one bar for evaluation and fine-tuning; silent when disabled."""

from __future__ import annotations

from retrofit.evaluation.progress import progress_bar


def test_a_disabled_bar_prints_nothing_and_takes_the_same_calls(capsys) -> None:
    with progress_bar("epoch 1/1", 10, enabled=False, metrics="loss {loss:.2f}") as advance:
        advance(10, loss=0.5)
    assert capsys.readouterr().err == ""


def test_a_kept_bar_counts_from_where_a_resumed_epoch_stood_and_shows_its_metrics(capsys) -> None:
    with progress_bar("epoch 2/3", 10, enabled=True, done=4, keep=True,
                      metrics="loss {loss:.2f}  acc {top1:5.1f}%") as advance:
        advance(6, loss=0.25, top1=87.5)
    shown = capsys.readouterr().err
    assert "epoch 2/3" in shown and "10/10" in shown and "loss 0.25  acc  87.5%" in shown


def test_a_transient_bar_leaves_no_line_behind(capsys) -> None:
    with progress_bar("evaluating", 5, enabled=True) as advance:
        advance(5)
    assert "evaluating" not in capsys.readouterr().err
