"""KFP lightweight Python components, one per step, each a thin wrapper over one medseg module.

Every component runs in the project image (``base_image``, from ``MEDSEG_IMAGES__PROJECT``),
which already holds kfp and medseg: ``install_kfp_package=False`` and nothing installed at run
time, which is also exactly what ``kfp.local``'s SubprocessRunner runs. Steps hand each other
typed artifacts whose file is a reference to the data in the object store, naming its content
(:mod:`medseg.platform.pipeline_params`); parameter groups arrive as ``dict`` and are validated
there too. Credentials come from the environment (a Kubernetes Secret on a cluster, see
:mod:`pipelines.medseg_pipeline`).
"""

from components.deploy import deploy_op
from components.evaluate import evaluate_op
from components.gate import gate_op
from components.ingest import ingest_op
from components.params import params_op
from components.predict import predict_op
from components.preprocess import preprocess_op
from components.register import register_op
from components.shards import clean_shard_op, predict_shard_op, preprocess_shard_op, shards_op
from components.train import train_op

__all__ = [
    "clean_shard_op",
    "deploy_op",
    "evaluate_op",
    "gate_op",
    "ingest_op",
    "params_op",
    "predict_op",
    "predict_shard_op",
    "preprocess_op",
    "preprocess_shard_op",
    "register_op",
    "shards_op",
    "train_op",
]
