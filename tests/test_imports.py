"""Our folders must not shadow the stdlib `platform` or a PyPI `kernels` (Ray puts the repo root
on sys.path), and model/ + kernels/ stay free of orchestration libraries (ray, deepspeed, mlflow,
boto3: those belong to platform/, so the model runs and is tested as plain PyTorch)."""

import ast
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO


def run_with_repo_on_path(code: str, extra_path: list[str] = ()):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *extra_path]))
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_stdlib_platform_is_not_shadowed():
    result = run_with_repo_on_path("""
        import platform, uuid, sysconfig
        assert platform.system(), "platform.system() empty"
        assert platform.__file__.startswith(sysconfig.get_paths()["stdlib"]), platform.__file__
        uuid.uuid4()
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_an_installed_kernels_package_is_not_shadowed(tmp_path):
    (tmp_path / "kernels.py").write_text("REAL = True\n")
    result = run_with_repo_on_path("import kernels; print(kernels.REAL)", [str(tmp_path)])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"


def test_repo_root_folders_have_no_init_that_could_shadow():
    assert not (REPO / "platform" / "__init__.py").exists()
    assert not (REPO / "kernels" / "__init__.py").exists()


def test_ttte2e_imports_resolve_to_this_repo():
    result = run_with_repo_on_path("""
        import ttte2e.model, ttte2e.kernels.attention, sys
        print(ttte2e.model.__file__); print(ttte2e.kernels.attention.__file__)
        print("ray" in sys.modules, "deepspeed" in sys.modules, "mlflow" in sys.modules)
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split("\n")
    assert lines[0].startswith(str(REPO / "model")) and lines[1].startswith(str(REPO / "kernels"))
    assert lines[2] == "False False False"  # importing the model loads no orchestration library


@pytest.mark.parametrize("folder", ["model", "kernels"])
def test_layering_model_and_kernels_import_no_orchestration(folder):
    forbidden = {"ray", "deepspeed", "mlflow", "boto3"} | (
        {"ttte2e.model"} if folder == "kernels" else set()
    )
    for path in (REPO / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top not in forbidden and not any(
                    name.startswith(f) for f in forbidden if "." in f
                ), f"{path}: imports {name}"
