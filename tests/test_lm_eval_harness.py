"""The `ttte2e` backend of lm-evaluation-harness: its scores are our prefill's NLLs (continued
TTT), batched and one-by-one requests agree, and the harness's own CLI runs local tasks offline
(multiple-choice loglikelihood and generate_until)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def lm(model_folder):
    from ttte2e.platform.eval.harness import TTTE2ELM

    return TTTE2ELM(pretrained=str(model_folder), batch_size=8)


def _requests(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _text(lm, n, seed):
    """A string of about n tokens decoded from random ids (re-encoding may change the count)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, lm.model.config.vocab_size, (n,), generator=g).tolist()
    return lm.tok_decode(ids)


def _prefill_logprob(lm, context_ids, continuation_ids, mode):
    from ttte2e.model.decode import prefill

    ids = torch.tensor([[lm.prefix_token_id] + context_ids + continuation_ids])
    _, nll = prefill(lm.model, ids, mode)
    return -float(nll[0, -len(continuation_ids) :].double().sum())


@pytest.mark.parametrize("mode", ["ttt", "swa", "full"])
def test_loglikelihood_is_the_prefill_nll_and_batching_changes_nothing(lm, mode):
    lm.mode = mode
    # contexts of a few chunks (b = 16, k = 32) and past the model's seq_len (128): TTT carries on
    contexts = [_text(lm, n, s) for s, n in enumerate((5, 40, 150))]
    continuations = [" " + _text(lm, n, 10 + n) for n in (1, 3, 20, 37)]
    pairs = [(c, x) for c in contexts for x in continuations]
    one_by_one = []
    lm.batch_size_per_gpu = 1
    for p in pairs:
        one_by_one += lm.loglikelihood(_requests("loglikelihood", [p]), disable_tqdm=True)
    lm.batch_size_per_gpu = 7  # batches split across contexts and across their continuations
    batched = lm.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    lm.mode = "ttt"
    for (c, x), (lp_1, g_1), (lp_b, g_b) in zip(pairs, one_by_one, batched):
        ctx_ids, cont_ids = lm._encode_pair(c, x)
        assert lp_1 == pytest.approx(_prefill_logprob(lm, ctx_ids, cont_ids, mode), abs=2e-4)
        assert lp_b == pytest.approx(lp_1, abs=2e-4) and g_b == g_1


def test_greedy_flag_and_rolling_loglikelihood(lm):
    from ttte2e.model.decode import generate

    context = _text(lm, 30, 1)
    ctx_ids = [lm.prefix_token_id] + lm.tok_encode(context)
    greedy_ids = generate(lm.model, [ctx_ids], max_new_tokens=4)[0]
    if lm.prefix_token_id in greedy_ids:
        greedy_ids = greedy_ids[: greedy_ids.index(lm.prefix_token_id)]
    assert greedy_ids, "the untrained model's greedy continuation starts with BOS"
    other = [(greedy_ids[0] + 1) % lm.model.config.vocab_size or 3]
    (_, is_g), (lp_1, _), (lp_o, is_o) = lm._loglikelihood_tokens(
        [(None, ctx_ids, greedy_ids), (None, ctx_ids, greedy_ids[:1]), (None, ctx_ids, other)]
    )
    assert is_g and not is_o and lp_1 > lp_o

    text = _text(lm, 300, 2)
    tokens = lm.tok_encode(text)
    (whole,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    assert whole == pytest.approx(_prefill_logprob(lm, [], tokens, "ttt"), abs=1e-3)
    lm.max_length = 64  # asked for: disjoint windows of 64, each prefilled on its own
    try:
        (windowed,) = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
    finally:
        lm.max_length = None
    # the harness's windows (context_len 1, as for its HF backend): 64 new tokens each, the
    # first after BOS, every later one read with 64 inputs (the previous tokens in front)
    expected = 0.0
    for start in range(0, len(tokens), 64):
        end = min(start + 64, len(tokens))
        ids = [lm.prefix_token_id] + tokens[:end] if start == 0 else tokens[end - 65 : end]
        expected += _window_logprob(lm, ids, end - start)
    assert windowed == pytest.approx(expected, abs=1e-3) and windowed != pytest.approx(whole)


def _window_logprob(lm, ids, n_predicted):
    from ttte2e.model.decode import prefill

    _, nll = prefill(lm.model, torch.tensor([ids]), "ttt")
    return -float(nll[0, -n_predicted:].double().sum())


def test_generate_until_is_the_models_greedy_text_cut_at_the_stop(lm):
    from ttte2e.model.decode import generate

    contexts = [_text(lm, n, 20 + n) for n in (10, 45, 140)]
    lm.batch_size_per_gpu = 2  # two batches of the same generation arguments
    try:
        texts = lm.generate_until(
            _requests(
                "generate_until", [(c, {"until": ["\n"], "max_gen_toks": 12}) for c in contexts]
            )
        )
    finally:
        lm.batch_size_per_gpu = 8
    for c, text in zip(contexts, texts):
        ids = generate(
            lm.model,
            [[lm.prefix_token_id] + lm.tok_encode(c)],
            max_new_tokens=12,
            stop_tokens=(lm.eot_token_id,),
        )[0]
        ids = [t for t in ids if t != lm.eot_token_id]
        assert text == lm.tok_decode(ids).split("\n")[0]
    # a stop string that occurs: the text ends before it
    stop = texts[2][len(texts[2]) // 2 :][:2] if len(texts[2]) > 3 else None
    if stop:
        (cut,) = lm.generate_until(
            _requests("generate_until", [(contexts[2], {"until": [stop], "max_gen_toks": 12})])
        )
        assert cut == texts[2][: texts[2].find(stop)]


def test_bad_arguments_are_named(model_folder, tmp_path):
    from ttte2e.platform.eval.harness import TTTE2ELM

    with pytest.raises(ValueError, match="mode='beam'"):
        TTTE2ELM(pretrained=str(model_folder), mode="beam")
    with pytest.raises(ValueError, match="unknown model_args \\['windw'\\]"):
        TTTE2ELM(pretrained=str(model_folder), windw=3)
    with pytest.raises(ValueError, match="auto-tuning is not supported"):
        TTTE2ELM(pretrained=str(model_folder), batch_size="auto")
    with pytest.raises(ValueError, match="needs pretrained="):
        TTTE2ELM()
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in model_folder.iterdir():
        if f.name != "tokenizer.json":
            (bare / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match="no tokenizer.json"):
        TTTE2ELM(pretrained=str(bare))
    lm = TTTE2ELM(pretrained=str(bare), tokenizer=str(model_folder / "tokenizer.json"))
    with pytest.raises(ValueError, match="unsupported generation arguments \\['num_beams'\\]"):
        lm.generate_until(_requests("generate_until", [("a", {"num_beams": 4})]))


def _write_tasks(folder: Path) -> Path:
    """Two local tasks (YAML + jsonl): multiple choice and generate_until."""
    folder.mkdir(parents=True, exist_ok=True)
    mc = [
        {
            "question": f"Question {i}: which word comes next in the list?",
            "choices": [" alpha", " beta gamma", " delta"],
            "label": i % 3,
        }
        for i in range(6)
    ]
    gen = [{"prompt": f"Say the number {i}:", "answer": str(i)} for i in range(4)]
    (folder / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (folder / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in gen))
    (folder / "local_mc.yaml").write_text(f"""task: ttte2e_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "mc.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""")
    (folder / "local_gen.yaml").write_text(f"""task: ttte2e_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / "gen.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
""")
    return folder


@pytest.mark.slow
def test_the_harness_cli_runs_local_tasks_offline(model_folder, lm, tmp_path, monkeypatch):
    """pipelines/lm_eval_harness.py in a fresh process, the harness's own arguments; the logged
    per-choice loglikelihoods are the backend's, and generate_until's text its greedy text."""
    tasks = _write_tasks(tmp_path / "tasks")
    out = tmp_path / "results"
    env = {
        **os.environ,
        **OFFLINE,
        "HF_HOME": str(tmp_path / "hf"),
        "HF_DATASETS_CACHE": str(tmp_path / "hf" / "datasets"),
    }
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "pipelines" / "lm_eval_harness.py"),
            "--model",
            "ttte2e",
            "--model_args",
            f"pretrained={model_folder},mode=ttt",
            "--tasks",
            "ttte2e_local_mc,ttte2e_local_gen",
            "--include_path",
            str(tasks),
            "--batch_size",
            "4",
            "--device",
            "cpu",
            "--output_path",
            str(out),
            "--log_samples",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert 0.0 <= results["ttte2e_local_mc"]["acc,none"] <= 1.0
    assert "exact_match,none" in results["ttte2e_local_gen"]
    samples = [
        json.loads(line)
        for line in next(out.rglob("samples_ttte2e_local_mc_*.jsonl")).read_text().splitlines()
    ]
    assert len(samples) == 6
    for s in samples:
        pairs = [(a["arg_0"], a["arg_1"]) for a in s["arguments"].values()]
        ours = lm.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
        logged = [r[0] for r in s["resps"]]
        assert [float(x[0]) for x in logged] == pytest.approx([o[0] for o in ours], abs=1e-4)
    gen = [
        json.loads(line)
        for line in next(out.rglob("samples_ttte2e_local_gen_*.jsonl")).read_text().splitlines()
    ]
    for s in gen:
        (expected,) = lm.generate_until(
            _requests(
                "generate_until", [(s["doc"]["prompt"], {"until": ["\n"], "max_gen_toks": 6})]
            )
        )
        assert s["resps"][0][0] == expected
    # the same tasks from Python, with our LM instance
    import lm_eval
    from lm_eval.tasks import TaskManager

    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    again = lm_eval.simple_evaluate(
        model=lm, tasks=["ttte2e_local_mc"], task_manager=TaskManager(include_path=str(tasks))
    )
    assert again["results"]["ttte2e_local_mc"]["acc,none"] == results["ttte2e_local_mc"]["acc,none"]


@pytest.mark.slow
def test_evaluate_scores_harness_tasks_per_mode(train_data, model_folder, tmp_path, monkeypatch):
    """pipelines/evaluate.py --harness-tasks: the held-out rolling-loglikelihood tasks and a local
    task, each mode from the same weights; the held-out word perplexity is the backend's own
    rolling loglikelihood of those texts."""
    from ttte2e.platform.cli.evaluate import main
    from ttte2e.platform.eval.harness import TTTE2ELM

    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    uri, _ = train_data
    tasks = _write_tasks(tmp_path / "tasks")
    out = main(
        [
            "--model",
            str(model_folder),
            "--data",
            uri,
            "--contexts",
            "128,256",
            "--windows",
            "2",
            "--harness-tasks",
            "heldout,ttte2e_local_mc",
            "--harness-include-path",
            str(tasks),
            "--out",
            str(tmp_path / "eval"),
        ]
    )
    scores = out["harness"]
    assert set(scores) == {"ttt", "swa", "full"}
    for mode in scores:
        assert set(scores[mode]) == {"ttte2e_heldout_128", "ttte2e_heldout_256", "ttte2e_local_mc"}
        assert scores[mode]["ttte2e_heldout_256"]["word_perplexity"] > 1
    assert scores["ttt"]["ttte2e_heldout_256"] != scores["swa"]["ttte2e_heldout_256"]
    # word perplexity = exp(-sum loglikelihood / words), from the backend directly
    import math
    import re

    texts = [
        json.loads(line)["text"]
        for line in (tmp_path / "eval" / "harness" / "tasks" / "ttte2e_heldout_256.jsonl")
        .read_text()
        .splitlines()
    ]
    lm = TTTE2ELM(pretrained=str(model_folder), mode="swa")
    total = sum(lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(t,) for t in texts])))
    words = sum(len(re.split(r"\s+", t)) for t in texts)
    assert scores["swa"]["ttte2e_heldout_256"]["word_perplexity"] == pytest.approx(
        math.exp(-total / words), rel=1e-3
    )
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "lm-evaluation-harness (ttte2e backend)" in report and "ttte2e_local_mc" in report
    # bad harness options stop the command before the loss-vs-context work starts
    import ttte2e.platform.cli.evaluate as evaluate_cli

    def no_scoring(*_a, **_k):
        raise AssertionError("scoring started before the options were checked")

    monkeypatch.setattr("ttte2e.platform.eval.long_context.loss_vs_context", no_scoring)
    with pytest.raises(SystemExit):
        evaluate_cli.main(
            [
                "--model",
                str(model_folder),
                "--data",
                uri,
                "--contexts",
                "128",
                "--harness-tasks",
                "heldout",
                "--harness-metadata",
                "{oops",
                "--out",
                str(tmp_path / "bad"),
            ]
        )


@pytest.mark.slow
def test_ruler_niah_runs_offline_with_the_models_own_tokenizer(model_folder, tmp_path):
    """RULER's S-NIAH through the CLI: its prompts sized by the model folder's tokenizer (read by
    AutoTokenizer through tokenizer_config.json), a 'repeat' haystack (no download)."""
    pytest.importorskip("transformers")
    pytest.importorskip("wonderwords")
    out = tmp_path / "results"
    env = {
        **os.environ,
        **OFFLINE,
        "HF_HOME": str(tmp_path / "hf"),
        "NLTK_DATA": str(tmp_path / "nltk"),
    }
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "pipelines" / "lm_eval_harness.py"),
            "--model",
            "ttte2e",
            "--model_args",
            f"pretrained={model_folder}",
            "--tasks",
            "niah_single_1",
            "--metadata",
            '{"max_seq_lengths": [512]}',
            "--limit",
            "2",
            "--batch_size",
            "2",
            "--device",
            "cpu",
            "--output_path",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert 0.0 <= results["niah_single_1"]["512,none"] <= 1.0
    assert "Using tokenizer " + str(model_folder) in run.stderr
