"""No host syncs in the GPU hot paths: model/ and kernels/ call .item(), .tolist(), .cpu(),
.numpy() or int/float/bool of a tensor reduction only where listed below, each for a reason. A sync
stalls the GPU's queue until everything before it ran (and under tensor parallelism, every rank
behind the slowest); one in the inner loop would cost a stall per chunk and block."""

import ast

from conftest import REPO

SYNC_METHODS = {"item", "tolist", "cpu", "numpy"}
# int(t.max()), bool(t.all()), ...: a Python number of a tensor reduction
REDUCTIONS = {"min", "max", "sum", "any", "all", "mean", "norm", "amax", "amin", "count_nonzero"}
ALLOWED = {
    ("model/transformer.py", "check_token_ids"): "input validation, once per call, before work",
    ("model/convert.py", "get"): "checkpoint conversion to the official layout (not a hot path)",
    ("model/model_folder.py", "add"): "writing a model folder",
    ("model/decode.py", "attend"): "decode, full-attention baseline only: grows its cache",
    ("model/decode.py", "attend_many"): "decode, full-attention baseline only: grows its cache",
    ("model/decode.py", "_ttt_steps"): "decode: rows grouped by chunk index, once per chunk",
    ("model/decode.py", "stream_generate"): "decode: stop when every row is done, per token",
    ("model/decode.py", "generate"): "decode: the tokens returned as Python lists",
    ("kernels/attention/self_check.py", "_rel_err"): "the self-check, once per device and dtype",
}


def _syncs(path):
    """(enclosing function, line, what) of each host sync in a file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node, function):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr in SYNC_METHODS and not node.args:
                found.append((function, node.lineno, f".{f.attr}()"))
            if (
                isinstance(f, ast.Name)
                and f.id in ("int", "float", "bool")
                and len(node.args) == 1
                and isinstance(node.args[0], ast.Call)
                and isinstance(node.args[0].func, ast.Attribute)
                and node.args[0].func.attr in REDUCTIONS
            ):
                found.append((function, node.lineno, f"{f.id}(.{node.args[0].func.attr}())"))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "<module>")
    return found


def test_no_host_syncs_in_model_and_kernels_outside_the_allow_list():
    files = sorted((REPO / "model").rglob("*.py")) + sorted((REPO / "kernels").rglob("*.py"))
    assert len(files) > 10
    unexpected, used = [], set()
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        for function, line, what in _syncs(path):
            if (rel, function) in ALLOWED:
                used.add((rel, function))
            else:
                unexpected.append(f"{rel}:{line} {what} in {function}()")
    assert not unexpected, "host syncs outside the allow list: " + "; ".join(unexpected)
    assert used == set(ALLOWED), f"allow-list entries that no longer sync: {set(ALLOWED) - used}"


def test_the_scan_finds_each_kind_of_sync(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        "def hot(t):\n"
        "    a = t.item()\n"
        "    b = t.sum().tolist()\n"
        "    c = int(t.max())\n"
        "    d = bool(t.any())\n"
        "    e = t.cpu()\n"
        "    f = t.to('cpu', non_blocking=True)\n"  # not a sync by itself: not flagged
    )
    assert [w for _, _, w in _syncs(sample)] == [
        ".item()",
        ".tolist()",
        "int(.max())",
        "bool(.any())",
        ".cpu()",
    ]
