"""The KServe custom predictor: a ``kserve.Model`` that segments brain MRI studies.

Open Inference Protocol v2 (REST and gRPC) inputs, one of:

``nifti`` (BYTES, shape ``[1]`` or ``[4]``)
    One 4D NIfTI (``.nii`` or ``.nii.gz``), or four 3D NIfTI files, one per modality. Their
    channel order is the request/input parameter ``channels`` (comma-separated modality names);
    without it, the model's own order (``data.channels`` of its ``model.yaml``). In a JSON body
    the elements are base64 strings, marked by the input parameter ``content_encoding: base64``.
``image`` (FP32 or FP16, shape ``[1, 4, X, Y, Z]`` or ``[4, X, Y, Z]``)
    A raw tensor in ``channels`` order (the model's by default), with its geometry as the
    parameter ``affine`` (16 numbers, row-major) or ``spacing`` (3 numbers, mm).

Request parameters: ``label_convention`` for the mask, one of the model's task's (BraTS:
``brats2021`` default, ``brats2023``, ``msd``); ``probabilities`` (bool) to add the
probabilities output. All of them are validated by :func:`medseg.codec.validate_params`, for
REST v1/v2 and gRPC alike.

Outputs (:data:`OUTPUTS`): ``mask`` (BYTES ``[1]``: a gzipped NIfTI label map on the input's
grid and affine), ``volumes_ml`` (FP32 ``[3]``: TC, WT, ET in mL), ``labels`` (UINT8
``[X, Y, Z]``: the same label map as a plain tensor on the request's grid, for clients that do
not read NIfTI; with the binary data extension or gRPC ``raw_output_contents`` it is the raw
voxels, C order) and ``probabilities`` (FP16 ``[1, 3, X, Y, Z]``). A request that names its
outputs gets those (and only those are encoded); one that names none gets all but
``probabilities``, which needs the parameter ``probabilities`` or its name. v1 ``:predict``
takes ``{"instances": [{"nifti_b64": …}]}`` or ``{"instances": [{"modalities": {"t1": b64, …}}]}``
and answers base64 masks and volumes.

Every answer names the model that gave it: the response parameters ``model_version``
(``NAME@vN`` of the registry) and ``model_sha256`` (of ``model.pt``), on v1 predictions as well,
and the HTTP headers :data:`VERSION_HEADER` and :data:`SHA256_HEADER` (see
:func:`medseg.register.model_identity`).

The three stages, each timed by kserve's own histograms (``request_preprocess_seconds`` …) and
by :data:`model_server.metrics.STAGE_SECONDS`: ``preprocess`` validates the request (shapes,
datatypes, parameters), takes one of ``max_concurrency`` slots, then decodes (bounded, see
:mod:`medseg.codec`) and checks the size after resampling; ``predict`` segments;
``postprocess`` encodes the answer. The slot is held from decoding to encoding and given back by
:meth:`MedsegPredictor.__call__` whichever stage ends the request. Every bad input raises
``kserve.errors.InvalidInput`` (HTTP 400, gRPC INVALID_ARGUMENT) naming the input, the problem
and the limit. A request whose client has gone or whose deadline has passed (:class:`Ticket`)
stops before and between the expensive stages.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from kserve import Model
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import InferInput, InferOutput, InferRequest, InferResponse

from medseg.classify import classify_images
from medseg.codec import (
    InferParams,
    InputError,
    check_resampled_size,
    check_shape,
    decode_nifti,
    split_bytes_tensor,
    validate_params,
)
from medseg.errors import MedsegError
from medseg.infer import CaseSegmentation, Segmenter, load_model, segment_case
from medseg.nifti import encode_label_map
from medseg.register import model_identity
from medseg.settings import ServerLimits
from medseg.storage import Storage
from model_server import classifier, metrics

__all__ = [
    "OUTPUTS",
    "SHA256_HEADER",
    "VERSION_HEADER",
    "MedsegPredictor",
    "RequestAbandoned",
    "Ticket",
    "current_ticket",
    "output_types",
    "plain_params",
]

#: The model's outputs and their datatypes; :func:`output_types` gives their shapes.
OUTPUTS = {"mask": "BYTES", "volumes_ml": "FP32", "labels": "UINT8", "probabilities": "FP16"}


def output_types(outputs: int) -> dict[str, tuple[str, list[int]]]:
    """The outputs as the metadata lists them, for a task of ``outputs`` regions.

    A ``-1`` is the case's own size.
    """
    shapes = {
        "mask": [1],
        "volumes_ml": [outputs],
        "labels": [-1, -1, -1],
        "probabilities": [1, outputs, -1, -1, -1],
    }
    return {name: (datatype, shapes[name]) for name, datatype in OUTPUTS.items()}


_TENSOR_TYPES = {"FP32": np.float32, "FP16": np.float16}
_T = TypeVar("_T")


class RequestAbandoned(Exception):
    """The request's client has gone or its deadline has passed; its work was stopped."""

    def __init__(self, reason: str, deadline: bool):
        super().__init__(reason)
        self.reason = reason
        self.deadline = deadline


class Ticket:
    """One request's right to go on: cancelled when its client goes or its deadline passes.

    Safe to check from worker threads (:meth:`check` raises :class:`RequestAbandoned`).
    """

    def __init__(self, timeout_s: float):
        self.deadline = time.monotonic() + timeout_s
        self.reason: str | None = None
        self._flag = threading.Event()
        self._event: asyncio.Event | None = None

    def abandon(self, reason: str) -> None:
        """Mark the request abandoned (call on the event loop)."""
        if self.reason is None:
            self.reason = reason
        self._flag.set()
        if self._event is not None:
            self._event.set()

    def remaining(self) -> float:
        """Seconds left before the deadline."""
        return self.deadline - time.monotonic()

    def check(self) -> None:
        """Raise :class:`RequestAbandoned` if the request should stop."""
        if self._flag.is_set():
            raise RequestAbandoned(self.reason or "abandoned", deadline=False)
        if self.remaining() <= 0:
            raise RequestAbandoned("the request's deadline passed", deadline=True)

    async def wait(self) -> None:
        """Return once the request is abandoned."""
        if self._event is None:
            self._event = asyncio.Event()
            if self._flag.is_set():
                self._event.set()
        await self._event.wait()


#: The ticket of the request being served (set by the REST route and the gRPC servicer).
current_ticket: contextvars.ContextVar[Ticket | None] = contextvars.ContextVar(
    "medseg_ticket", default=None
)


def _ticket() -> Ticket:
    ticket = current_ticket.get()
    assert ticket is not None, "set by MedsegPredictor.__call__"
    return ticket


class _Slot:
    """Whether the request being served holds one of the predictor's slots."""

    held = False


_current_slot: contextvars.ContextVar[_Slot | None] = contextvars.ContextVar(
    "medseg_slot", default=None
)


def plain_params(params: Any) -> dict[str, Any] | None:
    """REST (plain values) or gRPC (``InferParameter``) parameter maps as plain values."""
    if params is None:
        return None
    if not isinstance(params, Mapping) and not hasattr(params, "items"):
        raise InvalidInput(f"'parameters' must be an object, got {type(params).__name__}")
    out = {}
    for key, value in params.items():
        if hasattr(value, "WhichOneof"):
            choice = value.WhichOneof("parameter_choice")
            value = getattr(value, choice) if choice else None
        out[key] = value
    return out


@dataclass
class Job:
    """A validated request for one case, not yet decoded.

    Attributes:
        what: How messages name the input.
        params: Its validated parameters.
        order: Index, in the request's channel order, of each of the model's channels.
        blobs: NIfTI files (one 4D, or one 3D per channel), or None for a tensor.
        b64: The blobs are base64 text, decoded with the files (inside the slot).
        tensor: The raw tensor input, or None for NIfTI.
        shape: The tensor's ``[C, X, Y, Z]``.
        outputs: The outputs to answer (v2).
    """

    what: str
    params: InferParams
    order: list[int]
    outputs: frozenset[str] = frozenset()
    blobs: list[Any] | None = None
    b64: bool = False
    tensor: InferInput | None = None
    shape: list[int] = field(default_factory=list)


@dataclass
class Case:
    """A decoded case: a channel-first image in the model's channel order and its affine."""

    image: np.ndarray
    affine: np.ndarray


@dataclass
class Done:
    """A segmented job."""

    job: Job
    result: CaseSegmentation
    seconds: float


def _bad(exc: InputError) -> InvalidInput:
    return InvalidInput(str(exc))


#: The HTTP headers of every answer: the served model's registry version and weights' sha256.
VERSION_HEADER = "X-Medseg-Model-Version"
SHA256_HEADER = "X-Medseg-Model-Sha256"


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
        self._slots: asyncio.Semaphore | None = None
        self._storage = storage

    def load(self) -> bool:
        """Load the weights and config; the server reports ready only after this."""
        storage = self._storage or (Storage() if self.model_dir.startswith("s3://") else None)
        try:
            self.segmenter = load_model(self.model_dir, storage or Storage())
            self.identity = model_identity(storage or Storage(), self.model_dir)
        except MedsegError as exc:
            raise RuntimeError(f"cannot load model {self.name}: {exc}") from None
        self.ready = True
        return self.ready

    @property
    def channels(self) -> tuple[str, ...]:
        """The model's channel order (``data.channels`` of its ``model.yaml``)."""
        assert self.segmenter is not None
        return self.segmenter.cfg.data.channels

    async def run_in_slot(self, ticket: Ticket, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` in a worker thread, holding one of the ``max_concurrency`` slots.

        For routes beside the data plane (:mod:`model_server.dicom_route`): the same queue,
        ticket and cancellation as a v2 request, whose slot :meth:`__call__` holds instead.
        """
        slot = _Slot()
        token = _current_slot.set(slot)
        try:
            await self._acquire(ticket)
            return await self._in_thread(ticket, fn, *args)
        finally:
            _current_slot.reset(token)
            if slot.held and self._slots is not None:
                self._slots.release()

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

    # ------------------------------------------------------------ preprocess: decode

    async def preprocess(
        self, payload: dict[str, Any] | InferRequest, headers: dict[str, str] | None = None
    ) -> list[Any]:
        """Validate the request, wait for a slot, then decode its cases (bounded).

        Returns:
            ``[request, (job, case), …]``: each job with its decoded case.
        """
        if self.classifies:
            return await self._preprocess_images(payload)
        try:
            if isinstance(payload, InferRequest):
                jobs = [self.validate_v2(payload)]
            else:
                jobs = self.validate_v1(payload)
        except InputError as exc:
            raise _bad(exc) from None
        ticket = _ticket()
        await self._acquire(ticket)
        budget = [self.limits.max_decoded_bytes]  # shared by the request's cases
        cases = []
        try:
            for job in jobs:
                ticket.check()
                with metrics.stage("decode"):
                    case = await self._in_thread(ticket, self._decode, job, budget)
                metrics.CASE_VOXELS.observe(case.image.size)
                cases.append((job, case))
        except InputError as exc:
            raise _bad(exc) from None
        return [payload, *cases]

    @property
    def classifies(self) -> bool:
        """Whether the model's task classifies images (:mod:`model_server.classifier`)."""
        assert self.segmenter is not None
        return self.segmenter.task.outputs.kind == "classes"

    async def _preprocess_images(self, payload: dict[str, Any] | InferRequest) -> list[Any]:
        """A classifier's :meth:`preprocess`: validate, take a slot, decode (bounded)."""
        from model_server import compat  # here: compat imports this module

        assert self.segmenter is not None
        try:
            if isinstance(payload, InferRequest):
                raw = compat.raw_contents(payload.inputs[0]) if payload.inputs else None
                n = len(self.segmenter.task.outputs.names)
                job = classifier.v2_job(payload, raw, self.limits, n)
            else:
                job = classifier.v1_jobs(payload)
        except InputError as exc:
            raise _bad(exc) from None
        ticket = _ticket()
        await self._acquire(ticket)
        try:
            with metrics.stage("decode"):
                images = await self._in_thread(ticket, classifier.decode_images, job, self.limits)
        except InputError as exc:
            raise _bad(exc) from None
        return [payload, (job, images)]

    def validate_v2(self, request: InferRequest) -> Job:
        """The one validation of a v2 request (REST and gRPC): inputs, shapes, parameters.

        Raises:
            InputError: Naming the bad input or parameter.
        """
        if len(request.inputs) != 1:
            names = [i.name for i in request.inputs]
            raise InputError(f"expected one input, 'nifti' or 'image'; got {names}")
        inp = request.inputs[0]
        req_params = plain_params(request.parameters)
        in_params = plain_params(inp.parameters)
        params = self._with_convention(validate_params(req_params, in_params))
        order = params.channel_order(self.channels)
        outputs = _wanted_outputs(request, params)
        shape = check_shape(inp.shape, f"input {inp.name!r}", self.limits)
        if inp.name == "nifti":
            if inp.datatype != "BYTES":
                raise InputError(f"input 'nifti': datatype must be BYTES, got {inp.datatype}")
            blobs = self._blobs(inp, params)
            if len(blobs) != math.prod(shape):
                raise InputError(f"input 'nifti': {len(blobs)} BYTES elements for shape {shape}")
            b64 = params.content_encoding == "base64"
            return Job("input 'nifti'", params, order, outputs, blobs=blobs, b64=b64)
        if inp.name == "image":
            if inp.datatype not in _TENSOR_TYPES:
                raise InputError(
                    f"input 'image': datatype must be FP32 or FP16, got {inp.datatype}"
                )
            if len(shape) == 5 and shape[0] == 1:
                shape = shape[1:]
            if len(shape) != 4 or shape[0] != len(self.channels):
                raise InputError(
                    f"input 'image': expected {len(self.channels)} channels of 3D volumes "
                    f"([1, {len(self.channels)}, X, Y, Z]), got shape {list(inp.shape)}"
                )
            self._check_edges(shape[1:], "input 'image'")
            _check_tensor_size(inp, shape)
            return Job("input 'image'", params, order, outputs, tensor=inp, shape=shape)
        raise InputError(f"unknown input {inp.name!r}: send 'nifti' (BYTES) or 'image' (FP32/FP16)")

    def _with_convention(self, params: InferParams) -> InferParams:
        """``label_convention`` resolved against the model's task (its default when unset)."""
        assert self.segmenter is not None
        task = self.segmenter.task
        return params.with_convention(tuple(task.conventions), task.default_convention)

    def _blobs(self, inp: InferInput, params: InferParams) -> list[Any]:
        from model_server import compat  # here: compat imports this module

        raw = compat.raw_contents(inp)
        if raw is not None:  # gRPC raw_input_contents: our own framing check
            items: list[Any] = split_bytes_tensor(raw, "input 'nifti'")
        else:
            data = getattr(inp, "_data", None)
            items = [] if data is None else list(np.asarray(data, dtype=np.object_).reshape(-1))
            if not all(isinstance(b, (bytes, bytearray, memoryview)) for b in items):
                raise InputError("input 'nifti': elements must be bytes")
        if len(items) not in (1, len(self.channels)):
            raise InputError(
                f"input 'nifti' holds {len(items)} files: send one 4D NIfTI or "
                f"{len(self.channels)} 3D ones"
            )
        return items

    def validate_v1(self, payload: Mapping[str, Any]) -> list[Job]:
        """The v1 form of :meth:`validate_v2`: each instance becomes a job.

        Raises:
            InputError: Naming the bad instance or parameter.
        """
        instances = payload.get("instances") if isinstance(payload, Mapping) else None
        if not isinstance(instances, list) or not instances:
            raise InputError("v1 request needs a non-empty 'instances' list")
        if len(instances) > 8:
            raise InputError(f"v1 request holds {len(instances)} instances; at most 8")
        jobs = []
        for n, inst in enumerate(instances):
            what = f"instance {n}"
            if not isinstance(inst, Mapping):
                raise InputError(f"{what} must be an object")
            params = self._with_convention(
                validate_params({k: inst[k] for k in ("label_convention", "channels") if k in inst})
            )
            if "nifti_b64" in inst:
                blobs = [_text(inst["nifti_b64"], f"{what} 'nifti_b64'")]
                order = params.channel_order(self.channels)
            elif isinstance(inst.get("modalities"), Mapping):
                mods = inst["modalities"]
                missing = [c for c in self.channels if c not in mods]
                if missing:
                    raise InputError(f"{what} 'modalities' lacks {', '.join(missing)}")
                blobs = [_text(mods[c], f"{what} modality {c}") for c in self.channels]
                order = list(range(len(self.channels)))
            else:
                raise InputError(f"{what} needs 'nifti_b64' or 'modalities'")
            jobs.append(Job(what, params, order, blobs=blobs, b64=True))
        return jobs

    def _check_edges(self, dims: list[int], what: str) -> None:
        if max(dims) > self.limits.max_edge:
            raise InputError(
                f"{what}: each edge must be at most max_edge={self.limits.max_edge} voxels, "
                f"got {dims}"
            )

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
        slot = _Slot()
        token = _current_slot.set(slot)
        ticket = current_ticket.get()
        own = current_ticket.set(Ticket(self.limits.request_timeout_s)) if ticket is None else None
        metrics.INFLIGHT.inc()
        try:
            if verb is None:
                return await super().__call__(body, headers)
            return await super().__call__(body, headers, verb)
        finally:  # errors are counted where they are answered (REST middleware, gRPC status)
            metrics.INFLIGHT.dec()
            if own is not None:
                current_ticket.reset(own)
            _current_slot.reset(token)
            if slot.held and self._slots is not None:
                self._slots.release()

    async def predict(
        self,
        payload: Any,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> list[Any]:
        """Segment each decoded case (in a worker thread; the ticket can stop it)."""
        request, *cases = payload
        ticket = _ticket()
        if self.classifies:
            (job, images), segmenter = cases[0], self.segmenter
            with metrics.stage("segment") as timer:
                probs = await self._in_thread(ticket, classify_images, segmenter, images)
            return [request, (job, probs, timer.seconds)]
        done = []
        for job, case in cases:
            ticket.check()
            assert self.segmenter is not None
            with metrics.stage("segment") as timer:
                result = await self._in_thread(
                    ticket, segment_case, self.segmenter, case.image, case.affine, ticket.check
                )
            done.append(Done(job, result, timer.seconds))
        return [request, *done]

    async def _acquire(self, ticket: Ticket) -> None:
        """This request's slot (given back by :meth:`__call__`), unless it is abandoned first."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.limits.max_concurrency)
        slot = _current_slot.get()
        if slot is None:
            raise RuntimeError("MedsegPredictor stages run only through the model's __call__")
        ticket.check()
        waiting = asyncio.ensure_future(self._slots.acquire())
        gone = asyncio.ensure_future(ticket.wait())
        try:
            await asyncio.wait(
                {waiting, gone},
                timeout=max(0.0, ticket.remaining()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            gone.cancel()
            if not waiting.done():
                waiting.cancel()
        if waiting.done() and not waiting.cancelled():
            slot.held = True  # from here on, __call__ gives it back
            ticket.check()
            return
        ticket.check()
        raise RequestAbandoned("the request's deadline passed", deadline=True)

    async def _in_thread(self, ticket: Ticket, fn: Callable[..., _T], *args: Any) -> _T:
        """``fn(*args)`` in a worker thread; a cancelled caller still waits for it to stop.

        The slot must stay held until the thread has finished: the ticket tells the thread to
        stop at its next check.
        """
        fut = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            ticket.abandon("the call was cancelled")
            while not fut.done():
                try:
                    await asyncio.shield(fut)
                except asyncio.CancelledError:
                    continue
                except Exception:  # the thread stopped at a check: the cancellation wins
                    break
            raise

    def _decode(self, job: Job, budget: list[int]) -> Case:
        """The job's case, decoded within the limits, in the model's channel order.

        Args:
            job: The validated job.
            budget: ``[bytes]`` that decompression may still produce, shared by a request's
                cases.
        """
        limits = self.limits
        if job.tensor is not None:
            arr = job.tensor.as_numpy().reshape(job.shape)
            affine = job.params.geometry(limits)
            image = arr if job.order == list(range(len(job.order))) else arr[job.order]
            return self._checked(Case(image, affine), job.what)
        assert job.blobs is not None
        if job.b64:
            job.blobs = [_b64(b, f"{job.what} file {i}") for i, b in enumerate(job.blobs)]
        if len(job.blobs) == 1:
            vol = decode_nifti(job.blobs[0], job.what, limits, budget=budget)
            if vol.data.ndim != 4 or vol.data.shape[-1] != len(self.channels):
                raise InputError(
                    f"{job.what}: one file must be a 4D image [X, Y, Z, {len(self.channels)}], "
                    f"got shape {list(vol.data.shape)}; or send {len(self.channels)} 3D files"
                )
            image = np.moveaxis(vol.data, -1, 0)
            if job.order != list(range(len(job.order))):
                image = image[job.order]
            return self._checked(Case(np.ascontiguousarray(image), vol.affine), job.what)
        left = limits.max_case_voxels
        volumes = []
        for i, blob in enumerate(job.blobs):
            vol = decode_nifti(blob, f"{job.what} file {i}", limits, left, budget)
            left -= vol.data.size
            volumes.append(vol)
        shapes = {v.data.shape for v in volumes}
        if len(shapes) != 1 or volumes[0].data.ndim != 3:
            raise InputError(
                f"{job.what}: the {len(volumes)} files must be 3D volumes of one shape, got "
                f"{[list(v.data.shape) for v in volumes]}"
            )
        image = np.stack([volumes[i].data for i in job.order])
        return self._checked(Case(image, volumes[job.order[0]].affine), job.what)

    def _checked(self, case: Case, what: str) -> Case:
        assert self.segmenter is not None
        self._check_edges(list(case.image.shape[1:]), what)
        check_resampled_size(
            case.image.shape[1:],
            case.affine,
            self.segmenter.cfg.data.spacing,
            case.image.shape[0],
            what,
            self.limits,
        )
        if not np.isfinite(case.image).all():
            raise InputError(f"{what} contains NaN or Inf values")
        return case

    # ------------------------------------------------------------ postprocess: encode

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
        with metrics.stage("encode"):
            if self.classifies:
                return self._class_response(request, *done[0])
            if isinstance(request, InferRequest):
                return await self._in_thread(_ticket(), self._v2_response, request, done[0])
            return await self._in_thread(_ticket(), _v1_predictions, done, self.identity)

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
        outputs = [_output(*o) for o in classifier.v2_outputs(probs, classes, job)]
        return InferResponse(
            model_name=self.name,
            infer_outputs=outputs,
            response_id=request.id,
            parameters={"compute_ms": round(seconds * 1000), **self.identity},
            use_binary_outputs=True,
        )

    def _v2_response(self, request: InferRequest, done: Done) -> InferResponse:
        """The outputs the request names (all but ``probabilities`` when it names none)."""
        params, result = done.job.params, done.result
        wanted = done.job.outputs
        outputs = []
        label_map = result.label_map(params.label_convention)
        if "mask" in wanted:
            mask = encode_label_map(label_map, result.affine)
            outputs.append(_output("mask", "BYTES", [1], np.array([mask], dtype=np.object_)))
        if "volumes_ml" in wanted:
            names = list(result.volumes_ml)
            volumes = np.array([result.volumes_ml[r] for r in names], dtype=np.float32)
            regions = {"regions": ",".join(names)}
            outputs.append(_output("volumes_ml", "FP32", [len(names)], volumes, regions))
        if "labels" in wanted:
            convention = {"label_convention": params.label_convention}
            outputs.append(_output("labels", "UINT8", list(label_map.shape), label_map, convention))
        if "probabilities" in wanted:
            probs = result.probabilities.astype(np.float16)[None]
            outputs.append(_output("probabilities", "FP16", list(probs.shape), probs))
        return InferResponse(
            model_name=self.name,
            infer_outputs=outputs,
            response_id=request.id,
            parameters={
                "label_convention": params.label_convention,
                "compute_ms": round(done.seconds * 1000),
                **self.identity,
            },
            use_binary_outputs=True,
        )


def _v1_predictions(done: list[Done], identity: dict[str, str]) -> dict[str, Any]:
    predictions = []
    for d in done:
        convention = d.job.params.label_convention
        mask = encode_label_map(d.result.label_map(convention), d.result.affine)
        predictions.append(
            {
                "mask_b64": base64.b64encode(mask).decode(),
                "label_convention": convention,
                "volumes_ml": d.result.volumes_ml,
                "compute_ms": round(d.seconds * 1000),
                **identity,
            }
        )
    return {"predictions": predictions}


def _wanted_outputs(request: InferRequest, params: InferParams) -> frozenset[str]:
    """The outputs to answer: those named (known ones only), else all but ``probabilities``.

    Raises:
        InputError: For an unknown output name.
    """
    named = [o.name for o in request.request_outputs or []]
    unknown = sorted(set(named) - set(OUTPUTS))
    if unknown:
        raise InputError(
            f"unknown output(s) requested: {', '.join(unknown)}; the model answers "
            f"{', '.join(OUTPUTS)}"
        )
    if named:
        return frozenset(named)
    return frozenset(n for n in OUTPUTS if n != "probabilities" or params.probabilities)


def _check_tensor_size(inp: InferInput, shape: list[int]) -> None:
    """The tensor's data hold exactly its shape (gRPC does not check this for us)."""
    from model_server import compat  # here: compat imports this module

    count = math.prod(shape)
    raw = compat.raw_contents(inp)
    if raw is not None:
        itemsize = np.dtype(_TENSOR_TYPES[inp.datatype]).itemsize
        if len(memoryview(raw).cast("B")) != count * itemsize:
            raise InputError(
                f"input 'image': {len(raw)} bytes do not hold {inp.datatype} of shape "
                f"{list(inp.shape)} ({count * itemsize} bytes)"
            )
        return
    data = getattr(inp, "_data", None)
    size = np.size(data) if isinstance(data, np.ndarray) else len(data or [])
    if size != count:
        raise InputError(f"input 'image': {size} values for shape {list(inp.shape)}")


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise InputError(f"{what} must be a base64 string")
    return value


def _b64(value: Any, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("ascii", "replace")
    if not isinstance(value, str):
        raise InputError(f"{what} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise InputError(f"{what} is not valid base64") from None


def _output(
    name: str,
    datatype: str,
    shape: list[int],
    data: np.ndarray,
    params: dict[str, Any] | None = None,
) -> InferOutput:
    out = InferOutput(name=name, shape=shape, datatype=datatype, parameters=params)
    out.set_data_from_numpy(data, binary_data=True)
    return out
