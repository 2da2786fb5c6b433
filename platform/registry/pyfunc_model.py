"""The MLflow pyfunc flavor of a registered TTT-E2E model (text in, text out), as an MLflow
models-from-code file: MLflow copies this file into every registered model and runs it when the
model is loaded (`mlflow.pyfunc.load_model`). Nothing else imports it.

Weights come from the logged artifact `weights` (small models, logged whole) or from
model_config["weights_uri"] (large models, registered by reference: a model folder or checkpoint,
local or s3://).
"""

import warnings

import pandas as pd
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

from ttte2e.platform.registry.serving import GENERATION_DEFAULTS, TextGenerator, prompts_of

# the model is logged with an explicit signature (serving.pyfunc_signature): MLflow's notice,
# given when this class is defined, about inferring one from type hints does not apply
warnings.filterwarnings("ignore", message=".*type hints to the `predict` method")


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

    def predict(self, context, model_input, params=None):
        options = dict(GENERATION_DEFAULTS)
        options.update(params or {})
        return pd.DataFrame({"text": self.generator(prompts_of(model_input), **options)})


set_model(TTTTextModel())
