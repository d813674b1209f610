"""The file MLflow logs as the servable model ("models from code": no pickled Python object).

Loading the model runs this file, which builds segstudy.deploy.serving.SegmentationModel from the
installed package; its weights and settings come from the logged artefacts and model_config.
"""

import mlflow

from segstudy.deploy.serving import SegmentationModel

mlflow.models.set_model(SegmentationModel())
