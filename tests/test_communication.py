"""What crosses the wire per optimizer step, counted on gloo: DeepSpeed with the trainer's ZeRO
settings (platform/train/config.py zero_optimization) reduces the gradients once per step at
ZeRO-1, at every micro-step at ZeRO-2; and the tensor-parallel prefix gathers its sequence in the
compute dtype, in one buffer."""

from __future__ import annotations

import json
from collections import Counter

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ttte2e.model import TTTConfig, TTTModel

from conftest import SMALL, exit_rank_cleanly

# the collectives DeepSpeed and our tensor parallelism call (through torch.distributed)
COLLECTIVES = (
    "all_reduce",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "broadcast",
)
ACCUMULATION = 4


def _count_collectives(log: list):
    """Wrap torch.distributed's collectives (looked up at call time by DeepSpeed and by us) so
    each call appends (name, dtype of its first tensor, bytes) to log."""
    for name in COLLECTIVES:
        real = getattr(dist, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            first = tensors[-1] if tensors else None  # the input (last tensor argument)
            log.append(
                (
                    _name,
                    str(first.dtype) if first is not None else "",
                    first.numel() * first.element_size() if first is not None else 0,
                )
            )
            return _real(*args, **kwargs)

        setattr(dist, name, counted)


def _zero_worker(rank: int, init_file: str, out_file: str) -> None:
    import os

    from ttte2e.platform.train.config import BatchGeometry, TrainConfig
    from ttte2e.platform.train.trainer import MetaObjective, deepspeed_config, import_deepspeed

    torch.set_num_threads(1)
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2")  # DeepSpeed reads them
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        deepspeed = import_deepspeed(torch.device("cpu"))
        config = TTTConfig(**dict(SMALL, seq_len=32, window=16, chunk_size=8, bos_token_id=1))
        geometry = BatchGeometry(
            seq_len=32, sequences=2 * ACCUMULATION, workers=2, micro_batch=1,
            accumulation=ACCUMULATION, steps=1,
        )  # fmt: skip
        log: list = []
        _count_collectives(log)
        per_stage = {}
        for stage in (1, 2):  # one pair of processes for both (DeepSpeed's import is slow)
            torch.manual_seed(0)
            objective = MetaObjective(TTTModel(config))
            cfg = TrainConfig(preset="tiny", zero_stage=stage, workers=2, data="unused")
            engine, *_ = deepspeed.initialize(
                model=objective,
                model_parameters=objective.parameters(),
                config=deepspeed_config(cfg, geometry),
            )
            gen = torch.Generator().manual_seed(rank)
            per_micro_step = []
            for _ in range(ACCUMULATION):
                start = len(log)
                tokens = torch.randint(2, config.vocab_size, (1, 33), generator=gen)
                loss, *_ = engine(tokens, 1.0)
                engine.backward(loss)
                engine.step()
                per_micro_step.append(log[start:])
            per_stage[stage] = per_micro_step
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump(per_stage, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_rank_cleanly()


def _run(worker, tmp_path, *args) -> list:
    init_file, out_file = tmp_path / "init", tmp_path / "out.json"
    mp.start_processes(
        worker, args=(str(init_file), str(out_file), *args), nprocs=2, start_method="spawn"
    )
    return json.loads(out_file.read_text())


GRAD_REDUCTIONS = {"all_reduce", "reduce", "reduce_scatter", "reduce_scatter_tensor"}


def test_zero1_reduces_once_per_step_zero2_at_every_micro_step(tmp_path):
    per_stage = _run(_zero_worker, tmp_path)
    parameters = sum(p.numel() for p in TTTModel(TTTConfig(**SMALL)).parameters())
    for stage, per_micro_step in per_stage.items():
        reductions = [
            sum(n for name, _, n in calls if name in GRAD_REDUCTIONS) for calls in per_micro_step
        ]
        print(f"ZeRO-{stage}: bytes reduced per micro-step {reductions} ({parameters} parameters)")
        # the last micro-step reduces every gradient (fp32) at least once: the step's reduction
        assert reductions[-1] >= 4 * parameters
        if stage == "1":  # ... and the others nothing (beyond a few scalars: overflow checks)
            assert all(r < 1024 for r in reductions[:-1]), reductions
        else:
            assert all(r >= 4 * parameters / 2 for r in reductions), reductions
    assert set(per_stage) == {"1", "2"}


def _tp_worker(rank: int, init_file: str, out_file: str) -> None:
    from ttte2e.platform.train.tensor_parallel import parallelize

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        config = TTTConfig(
            **dict(SMALL, n_heads=4, seq_len=64, window=32, chunk_size=16, bos_token_id=1)
        )
        torch.manual_seed(0)
        model = TTTModel(config)
        parallelize(model, dist.group.WORLD)
        log: list = []
        _count_collectives(log)
        tokens = torch.randint(2, config.vocab_size, (1, 65), generator=torch.Generator())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model.prefix(tokens[:, :-1])
        if rank == 0:
            with open(out_file, "w") as f:
                json.dump([log], f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    exit_rank_cleanly()


def test_the_prefix_gathers_its_sequence_in_the_compute_dtype(tmp_path):
    (calls,) = _run(_tp_worker, tmp_path)
    counts = Counter((name, dtype) for name, dtype, _ in calls)
    config = TTTConfig(**dict(SMALL, n_heads=4))
    blocks = config.n_layers - config.n_ttt_blocks
    # per prefix block: 2 regions entered (attention, MLP) by a gather in bf16, left by a
    # reduce-scatter; plus the embedding's reduce-scatter and the final gather
    assert counts["all_gather_single", "torch.bfloat16"] == 2 * blocks, counts
    assert counts["all_gather_single", "torch.float32"] == 1, counts  # the prefix output
    assert not counts["all_gather", "torch.float32"] and not counts["all_gather", "torch.bfloat16"]
    assert sum(n for (name, _), n in counts.items() if name == "reduce_scatter_single") == (
        2 * blocks + 1
    )
