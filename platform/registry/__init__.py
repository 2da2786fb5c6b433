"""MLflow: experiment tracking (tracking), the model registry (model_registry), text generation
from a model folder (serving) and its pyfunc wrapper (pyfunc_model)."""
