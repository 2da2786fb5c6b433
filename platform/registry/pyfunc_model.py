"""The MLflow pyfunc flavor of a registered TTT-E2E model (text in, text out), as an MLflow
models-from-code file: MLflow copies this file into every registered model and runs it when the
model is loaded (`mlflow.pyfunc.load_model`). Nothing else imports it.

Weights come from the logged artifact `weights` (small models, logged whole) or from
model_config["weights_uri"] (large models, registered by reference: a model folder or checkpoint,
local or s3://).
"""

import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from ttte2e.platform.registry.serving import GENERATION_DEFAULTS, TextGenerator, prompts_of


class TTTTextModel(PythonModel):
    def load_context(self, context) -> None:
        from ttte2e.platform.registry.model_registry import load_weights

        folder = (context.artifacts or {}).get("weights") or (context.model_config or {}).get(
            "weights_uri"
        )
        if not folder:
            raise ValueError(
                "pyfunc model without weights: neither a 'weights' artifact nor "
                "model_config['weights_uri']"
            )
        self.generator = TextGenerator(*load_weights(folder))

    def predict(
        self, context, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        options = dict(GENERATION_DEFAULTS)
        options.update(params or {})
        return pd.DataFrame({"text": self.generator(prompts_of(model_input), **options)})


set_model(TTTTextModel())
