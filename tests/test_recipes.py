"""Every shipped recipe (recipes/*.yaml) is a valid run: known settings of the right types, a
model its preset accepts, a batch geometry that splits; flags override a recipe; a bad recipe is
one clear error."""

import re
from pathlib import Path

import pytest

from ttte2e.platform.cli.parsing import RecipeError
from ttte2e.platform.cli.train import parse, recipe_config
from ttte2e.platform.train.config import check_options

from conftest import REPO

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
SCRIPTS = {
    "pretrain_3b.py": "3b_pretrain_8k",
    "extend_context.py": "3b_extend_32k",
    "ablate.py": "760m_ablation",
}


def test_recipes_are_shipped_and_the_entry_scripts_load_theirs():
    assert {p.stem for p in RECIPES} >= set(SCRIPTS.values()) | {"3b_extend_128k"}
    for script, recipe in SCRIPTS.items():
        text = (REPO / "pipelines" / script).read_text()
        assert f'recipe="{recipe}"' in text, script


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_is_a_valid_run(path):
    cfg = recipe_config(str(path))
    model, geometry = check_options(cfg)
    assert geometry.steps >= 1 and geometry.tokens_per_step == cfg.batch_tokens
    for key, value in cfg.model_overrides.items():
        assert getattr(model, key) == value


def test_the_recipes_hold_the_papers_numbers():
    pretrain = recipe_config("3b_pretrain_8k")
    model = pretrain.model_config()
    assert (model.seq_len, model.window, model.chunk_size) == (8192, 8192, 1024)
    assert model.n_ttt_blocks * 4 == model.n_layers
    assert (pretrain.lr, pretrain.min_lr, pretrain.batch_tokens, pretrain.tokens) == (
        8e-4,
        1e-5,
        1 << 20,
        54_000_000_000,
    ) and pretrain.eta_ramp
    long = recipe_config("3b_extend_128k")
    assert long.model_config().seq_len == 131072 and long.lr == 4e-4 and not long.eta_ramp
    ablation = recipe_config("760m_ablation").model_config()
    assert ablation.n_layers == 24 and ablation.seq_len == 8192


def test_flags_override_the_recipe_and_config_picks_another(tmp_path):
    cfg, _ = parse(["--lr", "1e-3", "--seq-len", "16384"], "t", recipe="3b_extend_32k")
    assert cfg.lr == 1e-3 and cfg.model_config().seq_len == 16384 and not cfg.eta_ramp
    mine = tmp_path / "mine.yaml"
    mine.write_text("preset: tiny\nlr: 2.0e-3\nmodel:\n  window: 64\n")
    cfg, _ = parse(["--config", str(mine), "--steps", "3"], "t", recipe="3b_pretrain_8k")
    assert (cfg.preset, cfg.lr, cfg.steps, cfg.model_config().window) == ("tiny", 2e-3, 3, 64)


@pytest.mark.parametrize(
    "text, message",
    [
        ("lr: 8e-4\n", r"lr = '8e-4' is not a float .*write 8.0e-4"),
        ("learning_rate: 0.1\n", r"unknown setting 'learning_rate'"),
        ("model:\n  windw: 64\n", r"\(model\): unknown setting 'windw'"),
        ("- a list\n", r"a mapping of settings"),
    ],
)
def test_a_bad_recipe_is_refused_with_the_setting_named(tmp_path, text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(RecipeError, match=message):
        recipe_config(str(bad))


def test_an_unknown_recipe_lists_the_shipped_ones(capsys):
    with pytest.raises(SystemExit) as code:
        parse(["--config", "3b_pretrain_4k"], "t")
    err = capsys.readouterr().err
    assert code.value.code == 2 and "no recipes/3b_pretrain_4k.yaml" in err
    assert re.search(r"shipped: \[.*'3b_pretrain_8k'", err)
    assert Path(REPO / "recipes" / "3b_pretrain_8k.yaml").is_file()
