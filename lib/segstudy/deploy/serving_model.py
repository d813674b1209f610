"""The file MLflow logs as the servable model ("models from code": no pickled Python object).

Loading the model runs this file, which builds segstudy.deploy.serving.SegmentationModel from the
segstudy code logged with the model (code_paths); its weights and settings come from the logged
artefacts and model_config.
"""

import mlflow

from segstudy.deploy.serving import SegmentationModel, bound_json_errors, refuse_unreadable_bodies

bound_json_errors()  # in the scoring server: a malformed body is not quoted back whole
refuse_unreadable_bodies()  # ... and a client's mistake is a 4xx naming it, not a bare 500
mlflow.models.set_model(SegmentationModel())
