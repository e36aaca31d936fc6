"""MLflow models-from-code entry point of the served model (`pipeline.serve`): no pickled object."""
from mlflow.models import set_model

from pipeline.serve import AdapterModel

set_model(AdapterModel())
