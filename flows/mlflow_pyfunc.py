"""The `python_function` flavour of every posttrain model in MLflow ("models from code"):

    model = mlflow.pyfunc.load_model("models:/mimo_tiny.mopd@current")
    model.predict({"prompt": ["12+34="]})          # -> ["46"]  (greedy completions)

The LoggedModel holds this file, an MLmodel with a signature (prompt: string -> completion:
string) and its `model_config` {store, key}; `load_context` opens the weights in the posttrain
store (downloaded once for a remote store), so MLflow keeps no second copy of them (with
`--upload-weights` a copy also sits beside the MLmodel, for `mlflow.transformers`-style
reuse; this loader still reads the store). Loading needs `posttrain` importable (pip
requirement `posttrain`) and the store reachable: a store inside the state dir is recorded
relative to it and found beside the `sqlite:///` MLflow database (or in $POSTTRAIN_STATE_DIR).
`params={"max_new_tokens": N}` caps the completion length (default 32).

Run: ``python -c "import mlflow; print(mlflow.pyfunc.load_model('models:/mimo_tiny.mopd@current')
.predict({'prompt': ['12+34=']}))"`` with MLFLOW_TRACKING_URI pointing at the run's MLflow.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class StoreModel(PythonModel):
    """A causal LM whose weights live in the posttrain store under `key`."""

    def load_context(self, context: Any) -> None:
        from artifacts.store import Store
        from artifacts.tracking import store_at
        from tasks import models

        cfg = context.model_config or {}
        path = Store(store_at(cfg["store"], mlflow.get_tracking_uri())).local_path(cfg["key"])
        self.model = models.load_model(path)
        self.tokenizer = models.load_tokenizer(path)

    # A DataFrame hint, the one MLflow infers no schema from: the signature logged with the
    # model (prompt: string -> completion: string) stays what validates the input, and MLflow
    # does not warn about a missing hint in every stage's log.
    def predict(self, context: Any, model_input: pd.DataFrame,
                params: dict[str, Any] | None = None) -> list[str]:
        from tasks.evaluate import generate

        if hasattr(model_input, "columns"):  # a DataFrame: the signature's `prompt` column
            prompts = [str(x) for x in model_input[model_input.columns[0]]]
        else:
            prompts = [str(x) for x in model_input]
        n = int((params or {}).get("max_new_tokens", 32))
        return generate(self.model, self.tokenizer, prompts, n)


mlflow.models.set_model(StoreModel())
