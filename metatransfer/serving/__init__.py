"""MLflow pyfunc faces of the library's models (models-from-code: nothing pickled).

`target_model.py` serves a fine-tuned target model (images → class
predictions and probabilities); `few_shot_model.py` serves a meta-learner that
adapts on each request (support images + labels + query images → query
predictions), so new classes need no retraining. Both load safetensors
weights through the library, verifying checksums, and run no code from the
artifact itself.
"""
