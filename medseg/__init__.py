"""medseg: Kubernetes-native MLOps for 3D medical image segmentation (BraTS).

The core library: configuration, storage, data (synthetic generation, ingest, preprocessing,
reading), and — as they land — training, evaluation, registry and inference.
"""

from medseg.config import CHANNELS, REGIONS, MedsegConfig
from medseg.errors import MedsegError
from medseg.storage import Storage

__all__ = ["CHANNELS", "REGIONS", "MedsegConfig", "MedsegError", "Storage"]
__version__ = "0.1.0"
