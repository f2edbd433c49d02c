"""The KServe custom predictor: a ``kserve.Model`` that segments brain MRI studies.

:class:`MedsegPredictor` loads the model (network, transforms and config of its ``model.yaml``)
and runs kserve's three stages, each timed by kserve's own histograms
(``request_preprocess_seconds`` …) and by :data:`model_server.metrics.STAGE_SECONDS`:

``preprocess``
    validates the request (:mod:`model_server.protocol`; a classifier's:
    :mod:`model_server.classifier`), takes one of ``max_concurrency`` slots
    (:mod:`model_server.admission`), then decodes its cases (bounded);
``predict``
    segments (or classifies) them in a worker thread;
``postprocess``
    encodes the answer, naming the model that gave it (response parameters and the headers
    :data:`~model_server.protocol.VERSION_HEADER` and :data:`~model_server.protocol.SHA256_HEADER`).

The slot is held from decoding to encoding and given back by :meth:`MedsegPredictor.__call__`
whichever stage ends the request. Every bad input raises ``kserve.errors.InvalidInput`` (HTTP
400, gRPC INVALID_ARGUMENT) naming the input, the problem and the limit. A request whose client
has gone or whose deadline has passed (:class:`~model_server.admission.Ticket`) stops before and
between the expensive stages.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
from kserve import Model
from kserve.protocol.infer_type import InferRequest, InferResponse

from medseg.core.errors import InputError, MedsegError
from medseg.core.settings import ServerLimits
from medseg.core.storage import Storage
from medseg.inference.classify import classify_images
from medseg.inference.infer import Segmenter, load_model, segment_case
from medseg.registry.register import model_identity
from model_server import classifier, compat, metrics
from model_server.admission import (
    Slots,
    Ticket,
    in_thread,
    request_ticket,
    ticket_scope,
)
from model_server.protocol import (
    SHA256_HEADER,
    VERSION_HEADER,
    Done,
    SegmentationProtocol,
    infer_output,
    invalid,
    output_types,
    v1_predictions,
    v2_response,
)

__all__ = ["MedsegPredictor"]

_T = TypeVar("_T")


class MedsegPredictor(Model):
    """SegResNet brain tumour segmentation behind KServe.

    Args:
        name: Model name in the URL (``/v2/models/NAME/infer``).
        model_dir: Local folder or ``s3://`` prefix with ``model.yaml`` and ``model.pt``
            (``/mnt/models`` when KServe's storage initializer fetched it).
        limits: What requests may hold, and how many cases are segmented at once.
        storage: Storage for ``s3://`` model locations (from the environment by default).
    """

    def __init__(
        self,
        name: str,
        model_dir: str,
        limits: ServerLimits | None = None,
        storage: Storage | None = None,
    ):
        super().__init__(name, return_response_headers=True)
        self.model_dir = model_dir
        self.identity: dict[str, str] = {}
        self.limits = limits or ServerLimits()
        self.segmenter: Segmenter | None = None
        self.protocol: SegmentationProtocol | None = None
        self.slots = Slots(self.limits.max_concurrency)
        self._storage = storage

    def load(self) -> bool:
        """Load the weights and config; the server reports ready only after this."""
        storage = self._storage or (Storage() if self.model_dir.startswith("s3://") else None)
        try:
            self.segmenter = load_model(self.model_dir, storage or Storage())
            self.identity = model_identity(storage or Storage(), self.model_dir)
        except MedsegError as exc:
            raise RuntimeError(f"cannot load model {self.name}: {exc}") from None
        self.protocol = SegmentationProtocol.of(self.segmenter, self.limits)
        self.ready = True
        return self.ready

    @property
    def channels(self) -> tuple[str, ...]:
        """The model's channel order (``data.channels`` of its ``model.yaml``)."""
        assert self.segmenter is not None
        return self.segmenter.cfg.data.channels

    @property
    def classifies(self) -> bool:
        """Whether the model's task classifies images (:mod:`model_server.classifier`)."""
        assert self.segmenter is not None
        return self.segmenter.task.outputs.kind == "classes"

    async def get_input_types(self) -> list[dict[str, Any]]:
        if self.classifies:
            return [{"name": "image", "datatype": "BYTES", "shape": [-1]}]
        return [
            {"name": "nifti", "datatype": "BYTES", "shape": [-1]},
            {"name": "image", "datatype": "FP32", "shape": [1, len(self.channels), -1, -1, -1]},
        ]

    async def get_output_types(self) -> list[dict[str, Any]]:
        assert self.segmenter is not None
        n = len(self.segmenter.task.outputs.names)
        if self.classifies:
            shapes = {"probabilities": [-1, n], "label": [-1], "top_k": [-1, -1]}
            return [
                {"name": k, "datatype": d, "shape": shapes[k]}
                for k, d in classifier.CLASS_OUTPUTS.items()
            ]
        types = output_types(n)
        return [{"name": n, "datatype": d, "shape": s} for n, (d, s) in types.items()]

    async def run_in_slot(self, ticket: Ticket, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` in a worker thread, holding one of the ``max_concurrency`` slots.

        For routes beside the data plane (:mod:`model_server.dicom_route`): the same queue,
        ticket and cancellation as a v2 request, whose slot :meth:`__call__` holds instead.
        """
        with self.slots.scope():
            await self.slots.acquire(ticket)
            return await in_thread(ticket, fn, *args)

    # ------------------------------------------------------------ the three stages

    async def __call__(
        self,
        body: dict[str, Any] | InferRequest,
        headers: dict[str, str] | None = None,
        verb: Any = None,
    ) -> Any:
        """Run the three stages that kserve times, within one of ``max_concurrency`` slots.

        ``preprocess`` takes the slot (after validating, before decoding); it is given back
        here, after ``postprocess`` or whatever stage failed, so that no case is decoded,
        segmented or encoded outside a slot.
        """
        with self.slots.scope(), ticket_scope(self.limits.request_timeout_s):
            metrics.INFLIGHT.inc()
            try:
                if verb is None:
                    return await super().__call__(body, headers)
                return await super().__call__(body, headers, verb)
            finally:  # errors are counted where they are answered (REST middleware, gRPC)
                metrics.INFLIGHT.dec()

    async def preprocess(
        self, payload: dict[str, Any] | InferRequest, headers: dict[str, str] | None = None
    ) -> list[Any]:
        """Validate the request, wait for a slot, then decode its cases (bounded).

        Returns:
            ``[request, (job, case), …]``: each job with its decoded case.
        """
        if self.classifies:
            return await self._preprocess_images(payload)
        assert self.protocol is not None
        protocol = self.protocol
        try:
            if isinstance(payload, InferRequest):
                jobs = [protocol.validate_v2(payload)]
            else:
                jobs = protocol.validate_v1(payload)
        except InputError as exc:
            raise invalid(exc) from None
        ticket = request_ticket()
        await self.slots.acquire(ticket)
        budget = [self.limits.max_decoded_bytes]  # shared by the request's cases
        cases = []
        try:
            for job in jobs:
                ticket.check()
                with metrics.stage("decode"):
                    case = await in_thread(ticket, protocol.decode, job, budget)
                metrics.CASE_VOXELS.observe(case.image.size)
                cases.append((job, case))
        except InputError as exc:
            raise invalid(exc) from None
        return [payload, *cases]

    async def predict(
        self,
        payload: Any,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> list[Any]:
        """Segment each decoded case (in a worker thread; the ticket can stop it)."""
        request, *cases = payload
        ticket = request_ticket()
        if self.classifies:
            (job, images), segmenter = cases[0], self.segmenter
            with metrics.stage("segment") as timer:
                probs = await in_thread(ticket, classify_images, segmenter, images)
            return [request, (job, probs, timer.seconds)]
        done = []
        for job, case in cases:
            ticket.check()
            assert self.segmenter is not None
            with metrics.stage("segment") as timer:
                result = await in_thread(
                    ticket, segment_case, self.segmenter, case.image, case.affine, ticket.check
                )
            done.append(Done(job, result, timer.seconds))
        return [request, *done]

    async def postprocess(
        self,
        result: Any,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict[str, Any] | InferResponse:
        """Encode the answer (in a worker thread): a v2 ``InferResponse`` or v1 predictions."""
        request, *done = result
        if response_headers is not None:
            response_headers[VERSION_HEADER] = self.identity.get("model_version", "")
            response_headers[SHA256_HEADER] = self.identity.get("model_sha256", "")
        ticket = request_ticket()
        with metrics.stage("encode"):
            if self.classifies:
                return self._class_response(request, *done[0])
            if isinstance(request, InferRequest):
                args = (self.name, request, done[0], self.identity)
                return await in_thread(ticket, v2_response, *args)
            return await in_thread(ticket, v1_predictions, done, self.identity)

    # ------------------------------------------------------------ a classifier's stages

    async def _preprocess_images(self, payload: dict[str, Any] | InferRequest) -> list[Any]:
        """A classifier's :meth:`preprocess`: validate, take a slot, decode (bounded)."""
        assert self.segmenter is not None
        try:
            if isinstance(payload, InferRequest):
                raw = compat.raw_contents(payload.inputs[0]) if payload.inputs else None
                n = len(self.segmenter.task.outputs.names)
                job = classifier.v2_job(payload, raw, self.limits, n)
            else:
                job = classifier.v1_jobs(payload)
        except InputError as exc:
            raise invalid(exc) from None
        ticket = request_ticket()
        await self.slots.acquire(ticket)
        try:
            with metrics.stage("decode"):
                images = await in_thread(ticket, classifier.decode_images, job, self.limits)
        except InputError as exc:
            raise invalid(exc) from None
        return [payload, (job, images)]

    def _class_response(
        self, request: Any, job: classifier.ImageJob, probs: np.ndarray, seconds: float
    ) -> dict[str, Any] | InferResponse:
        """A classifier's answer: v2 outputs, or v1 predictions (class and probability)."""
        assert self.segmenter is not None
        task = self.segmenter.task
        classes = task.outputs.names
        if not isinstance(request, InferRequest):
            names = getattr(task, "class_names", {})
            return classifier.v1_predictions(probs, classes, names, self.identity)
        outputs = [infer_output(*o) for o in classifier.v2_outputs(probs, classes, job)]
        return InferResponse(
            model_name=self.name,
            infer_outputs=outputs,
            response_id=request.id,
            parameters={"compute_ms": round(seconds * 1000), **self.identity},
            use_binary_outputs=True,
        )
