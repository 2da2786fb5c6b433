"""A small corpus made on this machine, for the demo and tests (no hub downloads).

Documents are the Python standard library's sources (English prose in docstrings and code: a
codebase is a real long-context workload) plus the pydoc topic pages. A byte-level BPE is trained
on them with HF `tokenizers`. Held-out split by document. Packing follows the official pipeline:
BOS before every document, documents concatenated, windows of T+1 tokens stepping by T.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>"]  # ids 0, 1, 2: BOS = 1 as in the tiny preset


@dataclass
class DemoData:
    tokenizer_path: Path
    train_tokens: np.ndarray  # int32, documents concatenated, BOS before each
    val_tokens: np.ndarray
    n_train_docs: int
    n_val_docs: int
    bos_id: int


def stdlib_documents(max_docs: int | None = None) -> list[tuple[str, str]]:
    """(name, text) of the stdlib's .py files (tests and site-packages left out) + pydoc topics."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "test/", "idlelib/idle_test/")) or "/tests/" in rel:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) > 200:
            docs.append((rel, text))
    try:
        from pydoc_data.topics import topics
        docs += [(f"pydoc:{name}", text) for name, text in sorted(topics.items())]
    except ImportError:  # some distributions strip pydoc_data
        pass
    if not docs:
        raise RuntimeError(f"no standard-library sources found under {root}")
    return docs[:max_docs] if max_docs else docs


def _is_val(name: str, val_fraction: float) -> bool:
    bucket = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < val_fraction


def build_demo_data(out_dir: str | Path, vocab_size: int, max_docs: int | None = None,
                    val_fraction: float = 0.05) -> DemoData:
    """Train the tokenizer, tokenize, split by document; cached in out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "corpus.json"
    key = dict(vocab_size=vocab_size, max_docs=max_docs, val_fraction=val_fraction, version=1)
    if meta_path.exists() and json.loads(meta_path.read_text()).get("key") == key:
        meta = json.loads(meta_path.read_text())
        return DemoData(out / "tokenizer.json", np.load(out / "train.npy"), np.load(out / "val.npy"),
                        meta["n_train_docs"], meta["n_val_docs"], meta["bos_id"])

    docs = stdlib_documents(max_docs)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    train_docs = [text for name, text in docs if not _is_val(name, val_fraction)]
    tokenizer.train_from_iterator(train_docs, trainer=trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    bos = tokenizer.token_to_id("<bos>")

    def concat(texts: list[str]) -> np.ndarray:
        pieces = []
        for enc in tokenizer.encode_batch(texts):
            pieces.append(np.asarray([bos] + enc.ids, dtype=np.int32))
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int32)

    val_docs = [text for name, text in docs if _is_val(name, val_fraction)]
    train, val = concat(train_docs), concat(val_docs)
    np.save(out / "train.npy", train)
    np.save(out / "val.npy", val)
    meta_path.write_text(json.dumps(dict(key=key, n_train_docs=len(train_docs),
                                         n_val_docs=len(val_docs), bos_id=bos,
                                         train_tokens=int(train.size), val_tokens=int(val.size))))
    return DemoData(out / "tokenizer.json", train, val, len(train_docs), len(val_docs), bos)


def pack_windows(tokens: np.ndarray, seq_len: int) -> np.ndarray:
    """Contiguous windows of seq_len + 1 tokens stepping by seq_len: every token is a target once.

    The tail that does not fill a whole window is dropped (its count is returned by the caller's
    arithmetic: tokens.size - 1 - n * seq_len)."""
    n = (tokens.size - 1) // seq_len if tokens.size else 0
    if n <= 0:
        raise ValueError(f"{tokens.size} tokens cannot fill one window of {seq_len + 1}")
    idx = np.arange(seq_len + 1)[None, :] + seq_len * np.arange(n)[:, None]
    return tokens[idx]
