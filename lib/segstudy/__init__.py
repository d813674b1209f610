"""segstudy: a reproducible study of semantic segmentation of urban street scenes."""

__version__ = "0.1.0"

import os as _os
import warnings as _warnings

# MLflow imports tqdm.auto, which in a notebook kernel without ipywidgets warns that it falls back to
# text progress bars: text bars are what the executed notebooks and their HTML show anyway
_warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")
# MLflow draws a "Downloading artifacts" bar for every registered model it reads back: noise in a notebook
_os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
