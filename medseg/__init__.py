"""medseg: Kubernetes-native MLOps for medical image segmentation and classification.

The library, by stage (the picture and the import contracts: ``docs/architecture.md``):
``core`` (errors, names, settings, storage, cpus) < ``io`` (NIfTI, images, the report) < ``tasks``
(what differs between task families) < ``dicom`` < ``config`` < ``data`` (layouts, synthetic
data, ingest, manifests, preprocessing) < ``artifact`` | ``serving`` (the model's files and
lineage; the server's codec and client) < ``inference`` < ``registry`` < ``training`` |
``evaluation`` < ``platform`` (cluster objects, launchers, the pipeline's parameters and
shards) < ``apps`` (the demo, local servers) < ``cli``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medseg")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+unknown"

from medseg.core.cpus import fit_threads

# Before any medseg module imports torch or numpy: one thread per CPU of the container's limit.
fit_threads()
