"""metatransfer: meta-learning-based transfer learning as a reproducible pipeline.

The library is plain, typed Python with no Prefect import; ``tasks/`` and
``flows/`` wire it into Prefect, ``dvc.yaml`` into DVC.
"""

__version__ = "0.1.0"
