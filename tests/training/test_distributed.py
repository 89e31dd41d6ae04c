"""retrofit.training.distributed: N processes split each single-process batch between them."""

from __future__ import annotations

from retrofit.training.distributed import epoch_batches


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
