"""KFP lightweight Python components, one per step, each a thin wrapper over one medseg module.

Every component runs in the project image (``base_image``, from ``MEDSEG_IMAGES__PROJECT``),
which already holds kfp and medseg: ``install_kfp_package=False`` and nothing installed at run
time, which is also exactly what ``kfp.local``'s SubprocessRunner runs. Object-store locations
travel in the artifacts' metadata (``uri``); credentials come from the environment (a Kubernetes
Secret on a cluster, see :mod:`pipelines.medseg_pipeline`).
"""

from components.deploy import deploy_op
from components.evaluate import evaluate_op
from components.gate import gate_op
from components.ingest import ingest_op
from components.predict import predict_op
from components.preprocess import preprocess_op
from components.register import register_op
from components.train import train_op

__all__ = [
    "deploy_op",
    "evaluate_op",
    "gate_op",
    "ingest_op",
    "predict_op",
    "preprocess_op",
    "register_op",
    "train_op",
]
