"""Stage 5, deployment: inference on new images, `segstudy predict`, the servable MLflow model
and the model registry."""
