"""Text in, text out: prompts through a model's tokenizer and generation with continued
test-time training (model/decode.py). The MLflow pyfunc flavor (platform/registry/pyfunc_model.py) is built
on it, so a registered model works with `mlflow.pyfunc.load_model(...).predict(...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ttte2e.model.model_folder import TOKENIZER_FILE

# The pyfunc's parameters (name, MLflow type, default); predict(..., params=...) overrides them.
GENERATION_PARAMS = (
    ("max_new_tokens", "long", 64),
    ("temperature", "double", 0.8),
    ("top_p", "double", 0.95),
    ("repetition_penalty", "double", 1.1),
    ("mode", "string", "ttt"),
    ("seed", "long", 0),
)
GENERATION_DEFAULTS = {name: default for name, _, default in GENERATION_PARAMS}


def load_tokenizer(folder: str | Path):
    """The tokenizer saved beside a model's config.json, or None when it has none."""
    from tokenizers import Tokenizer

    path = Path(folder) / TOKENIZER_FILE
    return Tokenizer.from_file(str(path)) if path.is_file() else None


@dataclass
class TextGenerator:
    """A model and its tokenizer: prompts (str) in, continuations (str) out."""

    model: Any
    tokenizer: Any

    def __post_init__(self) -> None:
        if self.tokenizer is None:
            raise ValueError(
                f"this model has no tokenizer attached (no {TOKENIZER_FILE} beside its "
                "config.json); register it with --tokenizer, or pass token ids to "
                "TTTModel.generate"
            )

    def encode(self, prompt: str) -> list[int]:
        # documents start with BOS in training (prepare_data), so prompts do too
        return [self.model.config.bos_token_id] + self.tokenizer.encode(prompt).ids

    def __call__(
        self,
        prompts: list[str],
        max_new_tokens: int = 64,
        temperature: float = 0.8,
        top_p: float = 0.95,
        repetition_penalty: float = 1.1,
        mode: str = "ttt",
        seed: int | None = 0,
        on_token=None,
    ) -> list[str]:
        if isinstance(prompts, str):
            prompts = [prompts]
        bos = self.model.config.bos_token_id
        out = self.model.generate(
            [self.encode(p) for p in prompts],
            max_new_tokens=max_new_tokens,
            mode=mode,
            temperature=temperature,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop_tokens=(bos,),
            on_token=on_token,
        )
        # BOS would start the next document: the continuation ends there
        return [self.tokenizer.decode([t for t in ids if t != bos]) for ids in out]


def pyfunc_signature():
    """Input: a `prompt` string column; output: a `text` string column; generation parameters."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt")]),
        outputs=Schema([ColSpec("string", "text")]),
        params=ParamSchema([ParamSpec(n, t, d) for n, t, d in GENERATION_PARAMS]),
    )


def prompts_of(model_input) -> list[str]:
    """The prompts of a pyfunc input: a DataFrame with a `prompt` column, a dict, a list or a str."""
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # a DataFrame
        if "prompt" not in model_input.columns:
            raise ValueError(f"input has columns {list(model_input.columns)}; expected 'prompt'")
        return [str(p) for p in model_input["prompt"]]
    if isinstance(model_input, dict):
        value = model_input.get("prompt")
        return [value] if isinstance(value, str) else list(value or [])
    return [str(p) for p in model_input]
