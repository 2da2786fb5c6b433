"""The capacity plan's memory model (platform/train/plan.py) against what the model saves.

What the forward keeps for the backward is counted with saved-tensor hooks (unique storages,
parameters excluded) at small shapes and compared with the plan's terms; the whole step's peak is
compared by pipelines/bench/bench_parallel.py (README, benchmarks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ttte2e.model import TTTConfig, TTTModel
from ttte2e.model.inner_loop import run_inner_loop
from ttte2e.platform.train.plan import choose_layout, memory_per_gpu

from conftest import exit_rank_cleanly

GIB = 1 << 30


def _saved_bytes(work) -> int:
    seen: dict[int, int] = {}

    def pack(t):
        base = t._base if t._base is not None else t
        if not isinstance(base, nn.Parameter):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        kept = work()
    del kept
    return sum(seen.values())


def _model(**fields) -> TTTModel:
    torch.manual_seed(0)
    base = dict(
        vocab_size=512,
        d_model=64,
        n_layers=4,
        n_heads=4,
        mlp_hidden=256,
        n_ttt_blocks=1,
        seq_len=1024,
        window=128,
        chunk_size=64,
        bos_token_id=1,
    )
    return TTTModel(TTTConfig(**{**base, **fields}))


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize(
    "fields", [{}, dict(d_model=128, mlp_hidden=256, n_heads=2), dict(mlp_hidden=512, seq_len=2048)]
)
def test_prefix_activations_are_what_the_prefix_blocks_save(fields, bf16):
    model = _model(**fields)
    c = model.config
    tokens = torch.randint(2, c.vocab_size, (1, c.seq_len))
    # CPU autocast casts the matmuls as CUDA's does: the bf16 coefficients are counted here too
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        counted = _saved_bytes(lambda: model.prefix(tokens))
    plan = memory_per_gpu(c, c.seq_len, 0, 1, 1, bf16=bf16).prefix_activations
    assert plan == pytest.approx(counted, rel=0.08), (plan, counted)


@pytest.mark.parametrize("remat", ["chunk", "nested"])
def test_suffix_carries_are_what_the_remat_keeps(remat):
    model = _model(remat=remat)
    c = model.config
    h = torch.randn(1, c.seq_len, c.d_model, requires_grad=True)
    targets = torch.randint(2, c.vocab_size, (1, c.seq_len))
    counted = _saved_bytes(lambda: run_inner_loop(model, h, targets, targets != 1, 1.0))
    e = memory_per_gpu(c, c.seq_len, 0, 1, 1, bf16=False)
    # the carries the forward keeps, plus each group's slice of the suffix input (h itself)
    n = c.seq_len // c.chunk_size
    g = 1 if remat == "chunk" else c.remat_group_size(n)
    kept_by_forward = e.suffix_carries * (-(-n // g)) / (n if remat == "chunk" else -(-n // g) + g)
    # the first carry is theta_0 (the parameters themselves) and empty caches of k rows: the plan
    # counts it as a whole carry (conservative by that much)
    d, hidden, b = c.d_model, c.mlp_hidden, c.chunk_size
    first = 3 * d * hidden * 4 + 2 * b * d * 4
    expected = kept_by_forward - first + c.seq_len * d * 4
    assert expected == counted, (expected, counted)


def test_tensor_parallelism_and_offload_shrink_what_a_gpu_holds():
    c = _model().config.replace(seq_len=8192, window=1024, chunk_size=256)
    one = memory_per_gpu(c, c.seq_len, 0, 1, 1, bf16=False)
    two = memory_per_gpu(c, c.seq_len, 0, 1, 1, bf16=False, tensor_parallel=2)
    assert two.step < 0.6 * one.step and two.weights < one.weights
    moved = memory_per_gpu(c, c.seq_len, 0, 1, 1, bf16=False, offload="all")
    assert moved.step < one.step and moved.host > 0
    assert moved.step + moved.host >= one.step  # moved, not gone


def test_auto_picks_the_fewest_bytes_moved_that_fit():
    from ttte2e.model import preset

    model = preset("3B", seq_len=131072, checkpoint_prefix=True)
    tp, offload, candidates = choose_layout(
        model, 131072, 2, 64, 8, 16, 1, True, 80 * GIB, "auto", "auto"
    )
    chosen = next(x for x in candidates if (x["tensor_parallel"], x["offload"]) == (tp, offload))
    assert chosen["fits"] and chosen["total"] <= 80 * GIB
    assert all(x["moved"] >= chosen["moved"] for x in candidates if x["fits"])
    # data parallelism only (16 sequences do not even split over 64 GPUs) would not fit
    assert memory_per_gpu(model, 131072, 2, 64, 1).total > 80 * GIB


def test_the_128k_recipe_plan_fits_an_h100_with_the_layout_it_prints(capsys):
    from ttte2e.platform.cli.train import run_main

    run_main(
        "t",
        recipe="3b_extend_128k",
        argv=[
            "--plan",
            "--nodes",
            "8",
            "--gpus-per-node",
            "8",
            "--tensor-parallel",
            "auto",
            "--offload",
            "auto",
        ],
    )
    out = capsys.readouterr().out
    assert "tensor-parallel 4 (auto) x data-parallel 16, offload none (auto)" in out
    row = [line for line in out.splitlines() if line.strip().startswith("131072 ")][-1]  # memory
    assert row.endswith("(fits 79.1 GiB usable)"), row
    assert float(row.split()[-6]) <= 79.1, row  # the total


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tensor-parallel", "3"], "tensor parallelism 3 does not divide n_heads=32"),
        (["--tensor-parallel", "16"], "more than the 8 GPUs of a node"),
        (
            ["--tensor-parallel", "auto", "--nodes", "64", "--gpus-per-node", "1"],
            "no size up to a node's 1 GPUs splits the model and 16 sequences per step over 64 GPUs",
        ),
    ],
)
def test_a_plan_of_an_impossible_layout_is_one_error_line(capsys, flags, message):
    from ttte2e.platform.cli.train import run_main

    with pytest.raises(SystemExit) as exit_info:
        run_main("t", recipe="3b_extend_128k", argv=["--plan", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_a_choice_outside_its_list_is_refused_by_the_parser_naming_the_choices(capsys):
    from ttte2e.platform.cli.train import run_main

    with pytest.raises(SystemExit) as exit_info:
        run_main("t", recipe="3b_extend_128k", argv=["--plan", "--offload", "disk"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "disk" in err
    assert all(mode in err for mode in ("none", "carries", "prefix", "all", "auto"))


def _count_prefix_on_rank(rank: int, init_file: str, out_file: str) -> None:
    import json

    import torch.distributed as dist

    from ttte2e.platform.train.tensor_parallel import parallelize

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = _model()
        parallelize(model, dist.group.WORLD)
        tokens = torch.randint(
            2,
            model.config.vocab_size,
            (1, model.config.seq_len),
            generator=torch.Generator().manual_seed(0),
        )
        counted = _saved_bytes(lambda: model.prefix(tokens))
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(counted, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_rank_cleanly()


def test_the_sequence_parallel_prefix_saves_what_the_plan_says(tmp_path):
    import json

    import torch.multiprocessing as mp

    mp.start_processes(
        _count_prefix_on_rank,
        args=(str(tmp_path / "init"), str(tmp_path / "out")),
        nprocs=2,
        start_method="spawn",
    )
    counted = json.loads((tmp_path / "out").read_text())
    c = _model().config
    plan = memory_per_gpu(c, c.seq_len, 0, 1, 1, bf16=False, tensor_parallel=2)
    whole = memory_per_gpu(c, c.seq_len, 0, 1, 1, bf16=False)
    assert plan.prefix_activations == pytest.approx(counted, rel=0.08), (plan, counted)
    assert counted < 0.6 * whole.prefix_activations


def test_a_tensor_parallel_rank_of_3b_runs_on_fake_tensors_within_the_plan():
    """pipelines/bench/fake_plan_check.py at the 3B widths (4 of its layers, T 16K, TP 8): the
    tensor-parallel meta step and its backward run on fake tensors (no shape or stride error),
    every parameter gets a gradient, and the plan covers the tracked peak."""
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "pipelines" / "bench"))
    try:
        import fake_plan_check
    finally:
        sys.path.pop(0)
    r = fake_plan_check.run("3B", 16384, 8, layers=4)
    assert r["weights"] == pytest.approx(r["plan_weights"], rel=1e-3)
    assert r["forward"] < r["tracked"] <= r["plan"], r
