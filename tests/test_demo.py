"""The README's main job: the corpus it trains on, the schedule, and the whole job end to end
(a private `ray start --head`, then `ray job submit` of prepare_data and pretrain_3b.py)."""

import json

import pytest

from ttte2e.platform.data.demo_corpus import stdlib_documents, write_demo_corpus


def test_stdlib_corpus_has_documents():
    docs = stdlib_documents(max_docs=20)
    assert len(docs) == 20 and all(len(text) > 200 for _, text in docs)


def test_demo_corpus_is_jsonl_documents(tmp_path):
    folder = write_demo_corpus(tmp_path / "raw", max_docs=12, files=3)
    lines = [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in open(f)]
    assert len(lines) == 12 and all(len(x["text"]) > 200 for x in lines)


def test_books_stand_in_is_long_documents(tmp_path):
    from ttte2e.platform.data.demo_corpus import write_demo_books

    folder = write_demo_books(tmp_path / "books", max_books=3)
    books = sorted(folder.glob("*.txt"))
    assert len(books) == 3 and all(b.stat().st_size >= 200_000 for b in books)


@pytest.mark.slow
def test_demo_job_submits_prepare_and_training_to_a_private_head(tmp_path, capfd):
    import mlflow
    import psutil

    from ttte2e.model import TTTModel
    from ttte2e.platform.cluster.demo_job import run_demo

    before = {p.pid for p in psutil.process_iter()}
    result = run_demo(str(tmp_path / "demo"), steps=4, max_docs=200, name="t")
    out = capfd.readouterr().out
    assert "ray job submit -- python pipelines/pretrain_3b.py" in out and "succeeded" in out
    model = TTTModel.from_pretrained(f"{result['checkpoint']}/model")
    assert model.config.n_ttt_blocks == 1 and result["step"] == 4 and result["finished"]
    assert (tmp_path / "demo" / "runs" / "t" / "curves.png").stat().st_size > 10_000
    client = mlflow.MlflowClient(result["tracking_uri"])
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and "val_loss" in run.data.metrics
    assert {"curves.png", "metrics.json"} <= {
        a.path for a in client.list_artifacts(run.info.run_id)
    }
    # registered at the end of training, promoted, pulled back, and it generated text
    assert result["registered"]["uri"] == "models:/ttte2e-demo-tiny@candidate"
    aliases = client.get_registered_model("ttte2e-demo-tiny").aliases
    assert aliases == {
        "candidate": result["registered"]["version"],
        "champion": result["registered"]["version"],
    }
    assert "pulled models:/ttte2e-demo-tiny@champion" in out and "--- prompt:" in out
    # served: the session's second turn read only its new text; SIGTERM stopped the server
    first, second = result["served"]["turns"]
    assert first["cached_tokens"] == 0 and second["cached_tokens"] > first["prompt_tokens"]
    assert result["served"]["exit_code"] == 0
    # the head and all its processes are gone; nothing else was touched (the demo's processes
    # name its private temp dir, /tmp/ray-*, or its GCS port; another test's cluster may be up
    # beside it)
    marks = (result["ray_temp_dir"], f":{result['ray_gcs_port']} ")
    left = [
        p
        for p in psutil.process_iter(["cmdline"])
        if p.pid not in before and any(m in " ".join(p.info["cmdline"] or []) + " " for m in marks)
    ]
    assert not left, [p.info["cmdline"][:3] for p in left]
