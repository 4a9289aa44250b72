# The training app owns no tables: runs live in runs.models; adapters in MLflow.
