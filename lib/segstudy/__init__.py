"""segstudy: a reproducible study of semantic segmentation of urban street scenes."""

__version__ = "0.1.0"

import warnings as _warnings

# MLflow imports tqdm.auto, which in a notebook kernel without ipywidgets warns that it falls back to
# text progress bars: text bars are what the executed notebooks and their HTML show anyway. Here,
# because any segstudy module may be the first to import mlflow
_warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")
