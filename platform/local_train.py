"""In-process meta-training on one machine: the demo job until the Ray Train flow replaces it.

One process, the paper's outer recipe (AdamW 0.9/0.95, wd 0.1, global-norm clip 1.0, linear
warm-up over 10% of steps then cosine to 1e-5, inner eta ramping 0.1x -> 1x over the warm-up),
the chunked meta-objective, a held-out evaluation of TTT against the same weights without TTT,
a checkpoint (model.safetensors + config.json + optimizer/scheduler/step), an MLflow run on
sqlite and a PNG of the curves.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ttte2e.model import PRESETS, TTTModel, inner_lr_at, preset
from ttte2e.platform.cli import field_docs
from ttte2e.platform.data import StreamPosition, StreamSpec, WindowReader, iter_batches
from ttte2e.platform.demo_corpus import write_demo_corpus
from ttte2e.platform.prepare import PrepareOptions, prepare


@dataclass
class LocalTrainConfig:
    """Options of the in-process demo run."""

    preset: str = "tiny"
    """Model preset (ttte2e.model.PRESETS)."""
    steps: int = 300
    """Outer optimizer steps."""
    batch_size: int = 2
    """Sequences per step."""
    lr: float = 3e-3
    """Peak outer learning rate."""
    min_lr: float = 1e-5
    """Final learning rate of the cosine decay."""
    warmup_fraction: float = 0.1
    """Fraction of steps of linear warm-up (outer lr and inner eta ramp)."""
    weight_decay: float = 0.1
    """AdamW weight decay (all parameters, as the paper)."""
    grad_clip: float = 1.0
    """Outer global-norm gradient clip."""
    eval_every: int = 100
    """Evaluate on held-out windows every N steps (and at the end)."""
    eval_windows: int = 16
    """Held-out windows per evaluation."""
    out_dir: str = "runs/demo"
    """Where the corpus cache, checkpoint, MLflow database and plots go."""
    tracking_uri: str = ""
    """MLflow tracking URI; empty = sqlite in out_dir; 'off' disables tracking."""
    experiment: str = "ttte2e-demo"
    """MLflow experiment name."""
    seed: int = 0
    """Seed of the model init and the data order."""
    max_docs: int = 0
    """Use only the first N corpus documents (0 = all)."""
    ray: bool = True
    """Tokenize in Ray Data (a private local cluster unless RAY_ADDRESS is set)."""


def lr_factor(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine to floor/peak at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return (floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * progress))) / peak


def evaluate(model: TTTModel, windows: torch.Tensor) -> dict:
    """Held-out loss with TTT and of the same weights without it, overall and per chunk."""
    with torch.no_grad():
        ttt = model.meta_loss(windows)
        plain = model.meta_loss(windows, eta=0.0)
    return dict(loss_ttt=ttt.loss.item(), loss_no_ttt=plain.loss.item(),
                chunk_ttt=ttt.chunk_loss.mean(0).tolist(), chunk_no_ttt=plain.chunk_loss.mean(0).tolist())


def _plot(history: list[dict], evals: list[dict], chunk_size: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([h["step"] for h in history], [h["loss"] for h in history], label="train meta-loss")
    left.plot([e["step"] for e in evals], [e["loss_ttt"] for e in evals], "o-", label="held-out, TTT")
    left.plot([e["step"] for e in evals], [e["loss_no_ttt"] for e in evals], "s--",
              label="held-out, same weights, no TTT")
    left.set_xlabel("step"), left.set_ylabel("loss (nats/token)"), left.legend()
    last = evals[-1]
    ends = [(i + 1) * chunk_size for i in range(len(last["chunk_ttt"]))]
    right.plot(ends, last["chunk_ttt"], "o-", label="TTT")
    right.plot(ends, last["chunk_no_ttt"], "s--", label="no TTT")
    right.set_xlabel("context position (end of chunk)"), right.set_ylabel("held-out chunk loss")
    right.set_title(f"after step {last['step']}"), right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class _Tracker:
    """MLflow when enabled; otherwise nothing (the run still writes everything to out_dir)."""

    def __init__(self, cfg: LocalTrainConfig, out: Path):
        self.mlflow = None
        if cfg.tracking_uri == "off":
            return
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        import mlflow

        uri = cfg.tracking_uri or f"sqlite:///{(out / 'mlflow.db').resolve()}"
        mlflow.set_tracking_uri(uri)
        if mlflow.get_experiment_by_name(cfg.experiment) is None:
            mlflow.create_experiment(cfg.experiment,
                                     artifact_location=(out / "mlartifacts").resolve().as_uri())
        mlflow.set_experiment(cfg.experiment)
        self.run = mlflow.start_run()
        self.mlflow, self.uri = mlflow, uri

    def params(self, params: dict) -> None:
        if self.mlflow:
            self.mlflow.log_params({k: str(v) for k, v in params.items()})

    def metrics(self, values: dict, step: int) -> None:
        if self.mlflow:
            self.mlflow.log_metrics(values, step=step)

    def artifact(self, path: Path, folder: str | None = None) -> None:
        if self.mlflow:
            self.mlflow.log_artifact(str(path), artifact_path=folder)

    def end(self) -> str | None:
        if not self.mlflow:
            return None
        self.mlflow.end_run()
        return self.run.info.run_id


def train(cfg: LocalTrainConfig) -> dict:
    from tqdm import tqdm

    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; choose one of {sorted(PRESETS)}")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError("steps and batch_size must be >= 1")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model_cfg = preset(cfg.preset)
    print(f"[1/4] data: Python standard library as jsonl -> prepare_data (Ray Data, BPE "
          f"{model_cfg.vocab_size}) -> {out / 'data'}", flush=True)
    raw = write_demo_corpus(out / "raw", cfg.max_docs or None)
    manifest = prepare(PrepareOptions(input=str(raw), output=str(out / "data"),
                                      tokenizer=f"train:{model_cfg.vocab_size}",
                                      val_fraction=0.05, shard_tokens=1_000_000),
                       use_ray=cfg.ray, log=lambda msg: print("      " + msg, flush=True))
    if manifest["tokenizer"]["bos_id"] != model_cfg.bos_token_id:
        raise RuntimeError(f"tokenizer BOS id {manifest['tokenizer']['bos_id']} != model "
                           f"bos_token_id {model_cfg.bos_token_id}")
    spec = StreamSpec(str(out / "data"), model_cfg.seq_len, cfg.batch_size, seed=cfg.seed)
    val = WindowReader(str(out / "data"), "val", model_cfg.seq_len, cfg.seed)
    if val.windows_per_epoch < 1:
        raise ValueError("the held-out split has no window: use more documents (--max-docs)")
    val_windows = torch.from_numpy(val.windows(0, 0, min(cfg.eval_windows, val.windows_per_epoch)))
    stream = iter_batches(spec, epochs=1_000_000)
    position = StreamPosition()
    steps_per_epoch = spec.steps_per_epoch(WindowReader(spec.uri, "train", spec.seq_len, spec.seed))
    print(f"      {manifest['splits']['train']['documents']} train / "
          f"{manifest['splits']['val']['documents']} held-out documents; {steps_per_epoch} steps "
          f"of {cfg.batch_size} windows (T+1={model_cfg.seq_len + 1}) per epoch; this run: "
          f"{cfg.steps} steps ({cfg.steps / steps_per_epoch:.2f} epochs)", flush=True)

    model = TTTModel(model_cfg)
    warmup = max(1, round(cfg.warmup_fraction * cfg.steps))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.steps, warmup, cfg.lr, cfg.min_lr))
    tracker = _Tracker(cfg, out)
    tracker.params({**{f"model.{k}": v for k, v in model_cfg.to_dict().items()},
                    **{f"train.{k}": v for k, v in dataclasses.asdict(cfg).items()},
                    "model.parameters": model.num_parameters()})
    print(f"[2/4] meta-training {cfg.preset} ({model.num_parameters() / 1e6:.2f}M parameters, "
          f"{model_cfg.n_ttt_blocks}/{model_cfg.n_layers} TTT blocks, T={model_cfg.seq_len}, "
          f"k={model_cfg.window}, b={model_cfg.chunk_size}, remat={model_cfg.remat})", flush=True)

    history, evals = [], []
    bar = tqdm(range(cfg.steps), desc="meta-train", unit="step", dynamic_ncols=True)
    for step in bar:
        start = time.perf_counter()
        position, windows = next(stream)
        eta = inner_lr_at(step, warmup, model_cfg.inner_lr)
        out_step = model.meta_loss(torch.from_numpy(windows), eta=eta)
        optimizer.zero_grad(set_to_none=True)
        out_step.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        seconds = time.perf_counter() - start
        record = dict(step=step, loss=out_step.loss.item(), lr=lr, eta=eta, grad_norm=grad_norm,
                      tokens_per_s=cfg.batch_size * model_cfg.seq_len / seconds)
        if not math.isfinite(record["loss"]):
            raise FloatingPointError(f"non-finite loss at step {step}: {record}")
        history.append(record)
        tracker.metrics({k: v for k, v in record.items() if k != "step"}, step)
        bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.1e}", eta=f"{eta:.2f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            result = dict(step=step + 1, **evaluate(model, val_windows))
            evals.append(result)
            tracker.metrics({"val_loss_ttt": result["loss_ttt"],
                             "val_loss_no_ttt": result["loss_no_ttt"]}, step + 1)
            bar.write(f"      step {step + 1}: held-out loss {result['loss_ttt']:.3f} with TTT, "
                      f"{result['loss_no_ttt']:.3f} without (same weights)")

    print("[3/4] checkpoint + plots", flush=True)
    ckpt = out / "checkpoint"
    model.save_pretrained(ckpt)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
               ckpt / "optimizer.pt")
    (ckpt / "trainer_state.json").write_text(json.dumps(
        dict(step=cfg.steps, data=spec.uri, stream_position=position.to_dict(), seed=cfg.seed,
             train=dataclasses.asdict(cfg)), indent=2))
    (out / "tokenizer.json").write_bytes((out / "data" / "tokenizer.json").read_bytes())
    plot = out / "curves.png"
    _plot(history, evals, model_cfg.chunk_size, plot)
    (out / "metrics.json").write_text(json.dumps(dict(history=history, evals=evals), indent=1))
    for path, folder in ((plot, None), (out / "metrics.json", None), (ckpt / "config.json", "model"),
                         (out / "tokenizer.json", "model")):
        tracker.artifact(path, folder)
    run_id = tracker.end()
    print("[4/4] done", flush=True)
    final = evals[-1]
    print(f"  held-out loss: {final['loss_ttt']:.3f} with TTT vs {final['loss_no_ttt']:.3f} "
          f"without (last chunk: {final['chunk_ttt'][-1]:.3f} vs {final['chunk_no_ttt'][-1]:.3f})")
    print(f"  checkpoint : {ckpt.resolve()}  (TTTModel.from_pretrained)")
    print(f"  plots      : {plot.resolve()}")
    if run_id:
        print(f"  MLflow run : {run_id} in {tracker.uri}")
        print(f"               (browse: mlflow ui --backend-store-uri {tracker.uri})")
    return dict(checkpoint=str(ckpt), plot=str(plot), run_id=run_id, history=history, evals=evals)


def parse_args(argv: list[str] | None = None) -> LocalTrainConfig:
    parser = argparse.ArgumentParser(description="In-process TTT-E2E meta-training (demo).")
    docs = field_docs(LocalTrainConfig)
    for f in dataclasses.fields(LocalTrainConfig):
        flag, help_text = "--" + f.name.replace("_", "-"), docs.get(f.name, "")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default,
                                help=f"{help_text} (default: {f.default!r})")
    return LocalTrainConfig(**vars(parser.parse_args(argv)))
