"""MLflow pyfunc wrapper of a saved Merlin/Keras model, so the registry can hold it with a signature.

The platform environment (where MLflow tracks and registers) has no TensorFlow: this module
imports TensorFlow only when MLflow loads the model, which happens in the trainer environment.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel


class SavedKerasModel(PythonModel):
    """Runs the Keras SavedModel in the 'saved_model' artifact on a frame of NVTabular-encoded features."""

    def load_context(self, context: Any) -> None:
        import merlin.models.tf  # noqa: F401  (registers Merlin's layers with Keras)
        import tensorflow as tf

        self._model = tf.keras.models.load_model(context.artifacts["saved_model"])

    # A frame in, an array out: hints MLflow accepts without inferring a schema from them (the registered
    # signature is given explicitly at logging), where `Any` made it warn at every log and load.
    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        import tensorflow as tf

        features = {name: tf.constant(_array(model_input[name])) for name in model_input.columns}
        output = self._model(features, training=False).numpy()
        return output.reshape(-1) if output.shape[-1] == 1 else output  # a score per row, or an embedding


def _array(column: pd.Series) -> np.ndarray:
    """A column as the model takes it: a multi-valued feature's lists (one per row) as one [rows, width] array."""
    values = column.to_numpy()
    return np.stack([np.asarray(row) for row in values]) if values.dtype == object else values
