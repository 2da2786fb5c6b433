"""Training across a simulated 2-node cluster (ray.cluster_utils.Cluster: two raylets, 1 CPU each,
on this machine): the workers land on different nodes and the run's losses and gradient norms
equal those of the same run in one plain process (tests/conftest.py reference_run)."""

import pytest

from conftest import reference_run, small_config


@pytest.mark.slow
def test_training_spreads_over_two_nodes(train_data, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from ttte2e.platform.train.checkpoint import read_state
    from ttte2e.platform.train.driver import fit

    if ray.is_initialized():  # a session left by an earlier test module of this process
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address)
        cfg = small_config(
            train_data,
            tmp_path,
            name="spread",
            steps=2,
            placement="STRICT_SPREAD",
            checkpoint_every=2,
        )
        result = fit(cfg)
        nodes = read_state(result["checkpoint"])["nodes"]
        assert len(nodes) == 2 and len(set(nodes)) == 2, nodes
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert set(nodes) <= alive
        assert result["finished"] and len(result["history"]) == 2
        losses, norms = reference_run(cfg)
        assert [h["loss"] for h in result["history"]] == pytest.approx(losses, rel=1e-4)
        assert [h["grad_norm"] for h in result["history"]] == pytest.approx(norms, rel=1e-3)
    finally:
        ray.shutdown()
        cluster.shutdown()
