"""MLflow pyfunc faces of the library's models, and their HTTP server (nothing pickled, no code logged).

`target_model.py` serves a fine-tuned target model (images → class
predictions and probabilities); `few_shot_model.py` serves a meta-learner that
adapts on each request (support images + labels + query images → query
predictions), so new classes need no retraining. A logged model holds only
data; its MLmodel names one of these installed modules as `loader_module`,
whose `_load_pyfunc` checks the model folder (`artifacts.check_model_code`)
before it loads the safetensors weights through the library. `server.py`
serves one over HTTP with a request size limit and short, reason-first errors
(`answers.py`); `images.py` lets it take image files, preprocessed by
`prepare`'s own code.
"""
