"""A small corpus made on this machine, for the demo and tests (no hub downloads).

Documents are the Python standard library's sources (English prose in docstrings and code: a
codebase is a real long-context workload) plus the pydoc topic pages, written as DCLM-style jsonl
for `prepare_data` (which trains the demo's BPE, tokenizes and shards them).
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path


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


def write_demo_corpus(folder: str | Path, max_docs: int | None = None, files: int = 8) -> Path:
    """The stdlib documents as DCLM-style jsonl files ({"text": ...} per line) in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    docs = stdlib_documents(max_docs)
    for f in range(files):
        with open(folder / f"part-{f:03d}.jsonl", "w", encoding="utf-8") as out:
            for name, text in docs[f::files]:
                out.write(json.dumps({"text": text, "source": name}) + "\n")
    return folder


def write_demo_books(
    folder: str | Path, max_books: int | None = None, min_chars: int = 200_000
) -> Path:
    """Books stand-in: each stdlib package with enough source, all its modules concatenated into
    one long .txt document (a codebase is a real long-context workload)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for package in sorted(p for p in root.iterdir() if (p / "__init__.py").exists()):
        if package.name in ("test", "site-packages", "idlelib"):
            continue
        parts = []
        for path in sorted(package.rglob("*.py")):
            if "/tests/" in path.as_posix() or "/test/" in path.as_posix():
                continue
            parts.append(
                f"# ==== {path.relative_to(root).as_posix()} ====\n"
                + path.read_text(encoding="utf-8", errors="replace")
            )
        text = "\n".join(parts)
        if len(text) >= min_chars:
            (folder / f"{package.name}.txt").write_text(text, encoding="utf-8")
            written += 1
            if max_books and written >= max_books:
                break
    if not written:
        raise RuntimeError(f"no stdlib package under {root} has {min_chars} characters of source")
    return folder
