"""DICOM over REST: a zip of a study in, a DICOM SEG (or the SEG and its volumes report) out.

``POST /v2/models/{name}/dicom`` with ``Content-Type: application/zip`` and a zip of one study
(the four MR series, any folder structure inside) answers:

* ``200 application/dicom``: the DICOM Segmentation (TC, WT, ET) over the study's reference
  series (:func:`medseg.dicom.seg.make_seg`);
* with ``Accept: multipart/related; type="application/dicom"`` (the DICOMweb form, PS3.18):
  ``200 multipart/related`` whose two parts are the SEG and the TID 1500 volumes report.

The request goes through the server's :class:`~model_server.rest.BodyLimits` (request size,
in-flight bytes, body time) and takes a slot like a v2 request (same ticket, cancellation and
``max_concurrency``). The zip is read within :class:`~medseg.core.settings.ServerLimits`
(:func:`medseg.dicom.series.read_study` with ``limits``): its central directory is sized before it
is parsed, the declared sizes of its members are summed before any is inflated
(``max_decoded_bytes``: a zip bomb is refused before it inflates), and the series' voxels are
counted from their headers before any pixel is decoded (``max_case_voxels``, ``max_edge``,
then ``max_resampled_voxels`` at the model's spacing). Every refusal is a 400 naming the reason.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from kserve.errors import InvalidInput
from kserve.protocol.dataplane import DataPlane

from medseg.core.errors import InputError
from medseg.core.settings import ServerLimits
from medseg.dicom.seg import StudySegmentation
from medseg.dicom.series import DicomStudyError, read_study
from medseg.inference.study import segment_read_study
from medseg.serving.codec import check_resampled_size
from model_server.admission import Ticket, current_ticket
from model_server.predictor import MedsegPredictor

__all__ = ["DICOM", "MULTIPART", "PATH", "install", "multipart_related"]

#: The route, beside kserve's ``/v2/models/{name}/infer``.
PATH = "/v2/models/{model_name}/dicom"
#: Media type of a DICOM file (PS3.18).
DICOM = "application/dicom"
#: What a client accepts to get the SEG and the report together.
MULTIPART = "multipart/related"
_ZIP_TYPES = frozenset({"application/zip", "application/x-zip-compressed"})
_WHAT = "the study zip"

Serve = Callable[[Request, str, Callable[[bytearray], Awaitable[Response]]], Awaitable[Response]]


def multipart_related(parts: list[bytes], media_type: str = DICOM) -> tuple[bytes, str]:
    """A ``multipart/related`` body of ``parts`` (each of ``media_type``) and its Content-Type."""
    boundary = uuid.uuid4().hex
    head = f"--{boundary}\r\nContent-Type: {media_type}\r\n\r\n".encode()
    body = b"".join(head + part + b"\r\n" for part in parts) + f"--{boundary}--\r\n".encode()
    return body, f'{MULTIPART}; type="{media_type}"; boundary={boundary}'


def _segment(
    model: MedsegPredictor, body: bytes, limits: ServerLimits, ticket: Ticket
) -> StudySegmentation:
    """Read the study within the limits and segment it (runs in a worker thread, in a slot)."""
    segmenter = model.segmenter
    assert segmenter is not None
    try:
        study = read_study(body, limits=limits)
        ticket.check()
        check_resampled_size(
            study.image.shape[1:],
            study.affine,
            segmenter.cfg.data.spacing,
            study.image.shape[0],
            _WHAT,
            limits,
        )
        if not np.isfinite(study.image).all():
            raise InputError(f"{_WHAT} holds NaN or Inf values")
    except (DicomStudyError, InputError) as exc:
        raise InvalidInput(str(exc)) from None
    return segment_read_study(segmenter, study, ticket.check)


def install(app: FastAPI, dataplane: DataPlane, limits: ServerLimits, serve: Serve) -> None:
    """Add ``POST /v2/models/{name}/dicom`` to ``app``.

    Args:
        app: kserve's FastAPI app.
        dataplane: kserve's data plane (model registry and readiness).
        limits: The server's limits.
        serve: The REST layer's request wrapper (:func:`model_server.rest.install`): reads the
            bounded body, holds the ticket, maps refusals to 4xx.
    """

    async def dicom(request: Request, model_name: str) -> Response:
        async def handle(body: bytearray) -> Response:
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if kind not in _ZIP_TYPES:
                raise InvalidInput(
                    f"send a zip of the study with Content-Type: application/zip, not {kind!r}"
                )
            if not body:
                raise InvalidInput("empty request body: send a zip of the study")
            model = await dataplane.get_model(model_name)
            if not isinstance(model, MedsegPredictor):
                raise InvalidInput(f"model {model_name!r} does not take DICOM studies")
            ticket = current_ticket.get() or Ticket(limits.request_timeout_s)
            out = await model.run_in_slot(ticket, _segment, model, bytes(body), limits, ticket)
            if MULTIPART in request.headers.get("accept", "").lower():
                content, media_type = multipart_related([out.seg, out.report])
                return Response(content, 200, media_type=media_type)
            return Response(out.seg, 200, media_type=DICOM)

        return await serve(request, model_name, handle)

    app.add_api_route(PATH, dicom, methods=["POST"])
