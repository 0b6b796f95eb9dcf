"""selfmoe.training.distributed: Megatron's process groups are freed when its state is destroyed."""

from megatron.core import parallel_state as ps

from selfmoe.training.distributed import _live_groups, destroy_model_parallel, initialize_model_parallel


def test_model_parallel_groups_do_not_pile_up(mp):
    """megatron-core's destroy_model_parallel only drops its references: torch keeps each gloo
    subgroup (and its two threads) alive. Ours destroys what initialize_model_parallel created."""
    before = _live_groups()
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    leaked = _live_groups() - before
    assert len(leaked) > 0  # the fault: megatron-core alone leaves its earlier groups alive
    for _ in range(3):
        destroy_model_parallel()
        initialize_model_parallel(1, 1)
    grown = _live_groups() - before - leaked
    destroy_model_parallel()
    assert len(_live_groups() - before - leaked) == 0 and len(grown) > 0
    import torch.distributed as dist

    for g in leaked & _live_groups():  # the test's own leak
        dist.destroy_process_group(g)
    initialize_model_parallel(1, 1)  # what the mp fixture's teardown expects
