"""How the trigger groups due shards into flush jobs."""

from __future__ import annotations

from workers.flush_policy import BATCHES_PER_GROUPED_JOB, SHARDS_PER_JOB, flush_groups


def test_a_loops_few_rows_over_many_shards_go_to_one_job() -> None:
    backlog = [(shard, 5) for shard in range(20)]
    assert flush_groups(backlog, batch=500) == [list(range(20))]


def test_a_job_closes_once_its_shards_hold_its_batches() -> None:
    deep = BATCHES_PER_GROUPED_JOB * 500
    groups = flush_groups([(0, 3), (1, deep), (2, 4), (3, 4)], batch=500)
    assert groups == [[0, 1], [2, 3]]


def test_no_job_holds_more_than_its_share_of_shards() -> None:
    groups = flush_groups([(shard, 1) for shard in range(200)], batch=500)
    assert all(len(group) <= SHARDS_PER_JOB for group in groups)
    assert [shard for group in groups for shard in group] == list(range(200))


def test_nothing_due_is_no_job() -> None:
    assert flush_groups([], batch=500) == []
