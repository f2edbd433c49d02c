"""Inference engines: what runs the network's forward pass on a batch of windows or images.

A model artifact's weights (``model.pt``) are the reference. An artifact may also carry
:data:`GRAPH_FILE` (``model.onnx``): the same network exported as an ONNX graph, stamped with the
sha256 of the weights it was exported from. Its shapes are the task's
(:meth:`medseg.tasks.Task.graph_spec`): a segmentation graph has free batch and spatial sizes
(traced on the config's ``infer.roi_size``), so that it runs sliding windows and whole volumes alike
(``infer.window``); a classifier's has a free batch of images of ``data.image_size``. The engine is
chosen at load time by ``infer.engine`` (:data:`~medseg.config.Engine`, overridable by
:func:`medseg.inference.infer.load_model`'s ``engine``):

* ``torch``: the PyTorch network (the reference, and the only engine using the GPU);
* ``onnxruntime`` / ``openvino``: the exported graph on ONNX Runtime's or OpenVINO's CPU runtime;
* ``auto``: :data:`AUTO_ENGINE` when the artifact carries a graph and no GPU is present, else
  ``torch``; a missing graph is logged, not an error.

Precision is pinned, never left to the runtime (``infer.precision``,
:data:`~medseg.config.Precision`): OpenVINO's CPU plugin defaults ``INFERENCE_PRECISION_HINT`` to
bf16 on CPUs with native bf16 (AVX-512 BF16, AMX), which moved probabilities by up to 8e-3 against
PyTorch, so the same model would answer differently by node; medseg compiles every plan with the
configured precision (``f32`` by default) and checks what the plan reports. ONNX Runtime's CPU
provider and PyTorch on the CPU compute FP32 unless told otherwise (no fast-math option is set, and
``torch.get_float32_matmul_precision()`` stays ``highest``); ``bf16`` is refused for them.

Failure contract: an engine asked for by name whose graph is missing is an error. A graph that
is present but unreadable, exported from other weights than the artifact's ``model.pt``, or
exported for fixed window sizes (an older medseg) while ``infer.window`` is ``volume``, or for
other fixed sizes than the config's (a classifier's ``data.image_size`` changed), is an error
whatever the engine setting (a broken artifact is refused, never quietly served by another
engine). :func:`export_graph` traces the graph from a network; adding it to an artifact is
:mod:`medseg.registry.export`'s (:func:`medseg.registry.export.export_model`, and
:func:`medseg.registry.register.register` for every version it registers with ``export``).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.artifact.files import GRAPH_FILE
from medseg.config import Engine, MedsegConfig, Precision
from medseg.core.errors import MedsegError
from medseg.tasks import GraphSpec, task_of

__all__ = [
    "AUTO_ENGINE",
    "GRAPH_FILE",
    "Forward",
    "choose_engine",
    "export_graph",
    "graph_forward",
    "openvino",
    "openvino_precision",
    "weights_digest",
]

log = logging.getLogger(__name__)

#: ``auto``'s engine when a graph is there: fastest on a full-size case on this project's CPU
#: (``benchmarks/bench_engine.py``).
AUTO_ENGINE: Engine = "openvino"
#: ONNX metadata key holding the sha256 of the ``model.pt`` bytes the graph was exported from.
_WEIGHTS_KEY = "medseg.weights_sha256"
_INPUT, _OUTPUT = "image", "logits"
#: ONNX opset of the export (GroupNormalization and the resize modes SegResNet uses).
_OPSET = 18
#: OpenVINO's element type for each ``infer.precision`` (its ``INFERENCE_PRECISION_HINT``).
_OPENVINO_PRECISION: dict[str, str] = {"f32": "f32", "bf16": "bf16"}

#: A forward pass: a batch ``[B, C, *spatial]`` (windows or images) to float32 logits
#: (``[B, n_outputs, *spatial]`` per voxel, ``[B, n_outputs]`` per image).
Forward = Callable[[torch.Tensor], torch.Tensor]


def weights_digest(weights: bytes) -> str:
    """The sha256 that ties an exported graph to the ``model.pt`` bytes it came from."""
    return hashlib.sha256(weights).hexdigest()


def export_graph(net: torch.nn.Module, cfg: MedsegConfig, weights_sha256: str) -> bytes:
    """Export ``net`` as ONNX, traced on an input of the task's example shape.

    The free axes are the task's (:meth:`~medseg.tasks.Task.graph_spec`): for segmentation
    the batch size and the spatial sizes (any multiple of
    :func:`~medseg.tasks.networks.size_multiple`), so the graph runs sliding windows and whole
    volumes; for a classifier the batch size.

    Uses the TorchScript-based exporter: the ``torch.export`` one gives the same graph here
    but takes 4× as long (66 s against 25 s for the default SegResNet on this machine), which
    every registration and test would pay.

    Args:
        net: The network (put in eval mode on the CPU for the export).
        cfg: The model's config (its task, and the input shape the task derives from it).
        weights_sha256: :func:`weights_digest` of the weights ``net`` holds; stamped into the
            graph so a graph never runs with the wrong weights' artifact.

    Returns:
        The serialised ONNX model.
    """
    import onnx

    net = net.to("cpu").eval()
    spec = task_of(cfg).graph_spec(cfg)
    example = torch.zeros(spec.example)
    with tempfile.TemporaryDirectory(prefix="medseg-export-") as tmp:
        path = Path(tmp) / GRAPH_FILE
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notices
            torch.onnx.export(
                net,
                (example,),
                path,
                dynamo=False,
                input_names=[_INPUT],
                output_names=[_OUTPUT],
                dynamic_axes={_INPUT: dict(spec.input_axes), _OUTPUT: dict(spec.output_axes)},
                opset_version=_OPSET,
            )
        model = onnx.load_from_string(path.read_bytes())
    entry = model.metadata_props.add()
    entry.key, entry.value = _WEIGHTS_KEY, weights_sha256
    return bytes(model.SerializeToString())


def choose_engine(
    requested: Engine,
    has_graph: bool,
    device: torch.device,
    where: str,
    precision: Precision = "f32",
) -> str:
    """The engine that will run, from the setting, the artifact and the device.

    Args:
        requested: The engine setting.
        has_graph: Whether the artifact carries :data:`GRAPH_FILE`.
        device: The device PyTorch would use.
        where: The artifact's URI (for messages).
        precision: The ``infer.precision`` setting; ``bf16`` is for the ``openvino`` engine.

    Raises:
        MedsegError: If a graph engine is asked for and the artifact has no graph, or the
            precision is one the chosen engine does not run.
    """
    chosen = _engine(requested, has_graph, device, where)
    if precision != "f32" and chosen != "openvino":
        raise MedsegError(
            f"{where}: infer.precision {precision!r} is run by the openvino engine only, and "
            f"this model runs on {chosen} (engine setting {requested!r}"
            f"{'' if has_graph else f', no {GRAPH_FILE}'}): set infer.precision to 'f32', or "
            "engine to 'openvino' (on CUDA, reduced precision is infer.amp)"
        )
    return chosen


def _engine(requested: Engine, has_graph: bool, device: torch.device, where: str) -> str:
    if requested == "auto":
        if device.type == "cuda":
            return "torch"
        if not has_graph:
            log.info("%s has no %s: inference runs on PyTorch", where, GRAPH_FILE)
            return "torch"
        return AUTO_ENGINE
    if requested != "torch" and not has_graph:
        raise MedsegError(
            f"{where}: engine {requested!r} needs {GRAPH_FILE} in the model artifact and there "
            "is none: export it (medseg.registry.export.export_model) or use engine "
            "'torch' or 'auto'"
        )
    return requested


def openvino_precision(compiled: Any) -> str:
    """The precision a compiled OpenVINO plan runs (its ``INFERENCE_PRECISION_HINT``, e.g. f32)."""
    return str(compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())


def graph_forward(
    engine: str, graph: bytes, cfg: MedsegConfig, weights_sha256: str, where: str
) -> Forward:
    """Open the exported graph on ``engine`` (``onnxruntime`` or ``openvino``).

    Args:
        engine: The runtime.
        graph: The bytes of :data:`GRAPH_FILE`.
        cfg: The model's config (its task's :class:`~medseg.tasks.GraphSpec`, the precision).
        weights_sha256: :func:`weights_digest` of the artifact's ``model.pt``.
        where: The artifact's URI (for messages).

    Returns:
        The forward pass on the CPU.

    Raises:
        MedsegError: If the graph is unreadable, was exported from other weights or for other
            input sizes than the config's, or does not load on the runtime (the message names
            the artifact and the reason).
    """
    import onnx

    name = f"{where}/{GRAPH_FILE}"
    try:
        model = onnx.load_from_string(graph)
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf's DecodeError, the checker's ValidationError, …
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise MedsegError(f"{name} is not a valid ONNX model: {reason}") from None
    spec = task_of(cfg).graph_spec(cfg)
    _check_sizes(model, spec, cfg, name)
    stamped = {p.key: p.value for p in model.metadata_props}.get(_WEIGHTS_KEY)
    if stamped != weights_sha256:
        raise MedsegError(
            f"{name} was exported from other weights than {where}/model.pt "
            f"(graph: {stamped}, weights: {weights_sha256}): export it again"
        )
    try:
        if engine == "onnxruntime":
            return _onnxruntime_forward(graph)
        if engine == "openvino":
            return _openvino_forward(graph, spec, cfg.infer.precision)
    except Exception as exc:  # whatever the runtime raises on a graph it cannot compile
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise MedsegError(f"{name} does not load on {engine}: {reason}") from None
    raise MedsegError(f"unknown inference engine {engine!r}")


def _check_sizes(model: Any, spec: GraphSpec, cfg: MedsegConfig, name: str) -> None:
    """Refuse a graph whose fixed spatial sizes cannot run the inputs the model is given."""
    fixed = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[2:]]
    if spec.any_size and any(fixed):
        raise MedsegError(
            f"{name} was exported for windows of {fixed} voxels only and infer.window is "
            "'volume' (whole volumes): export it again (medseg.registry.export.export_model; for a "
            "registered version, register its run again: a version never changes), or set "
            "infer.window to 'sliding'"
        )
    wanted = list(spec.example[2:])
    if len(fixed) != len(wanted) or any(f and f != w for f, w in zip(fixed, wanted, strict=True)):
        raise MedsegError(
            f"{name} was exported for inputs of {fixed} and the model's config "
            f"({task_of(cfg).name}) runs inputs of {wanted}: export it again "
            "(medseg.registry.export.export_model), or restore the config it was exported with"
        )


def _onnxruntime_forward(graph: bytes) -> Forward:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])

    def forward(x: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(session.run([_OUTPUT], {_INPUT: batch})[0])

    return forward


def openvino() -> Any:
    """The ``openvino`` module, imported without its model-conversion tool, ``openvino.tools.ovc``.

    ``import openvino`` imports that tool, and the tool's import sends a usage event to Google
    Analytics (``openvino_telemetry``): it assumes consent where no opt-out file exists in
    ``$HOME/intel``, writes a client id there, and forks a process to send the event. A platform
    for patient data sends nothing off its machines, and a process forked from a threaded one can
    hang (it hung a test run here). medseg reads ONNX graphs with ``Core.read_model``, the C++
    reader, so the tool is kept out of the process. Where another import loaded it first, it
    is left as it is.
    """
    import sys

    sys.modules.setdefault("openvino.tools.ovc", None)  # type: ignore[arg-type]
    import openvino

    return openvino


def _openvino_forward(graph: bytes, spec: GraphSpec, precision: Precision) -> Forward:
    """OpenVINO on the CPU, one compiled plan per input shape.

    Every plan is compiled with ``INFERENCE_PRECISION_HINT`` set from ``infer.precision``
    (the plugin's own default is bf16 on CPUs with native bf16). A plan that reports another
    precision than ``f32`` when ``f32`` was asked for is an error; ``bf16`` asked for on a CPU
    without it runs as ``f32``, which is logged.

    A static shape lets OpenVINO plan every layer once (a dynamic-shape plan ran a full-size
    volume 1.5× slower): inputs of the task's example size (sliding windows, a classifier's
    images) are run in batches of ``spec.plan_batch`` (the last, smaller batch padded up to
    it), or all at once on a plan whose batch alone is free (``plan_batch`` ``None``), a whole
    volume with a plan compiled for its shape. The example-size plan is kept, and the last
    volume's (a new volume shape compiles in ~3 s); calls are serialised, as one plan's infer
    request runs one call at a time and uses every core.
    """
    core = openvino().Core()
    model = core.read_model(graph)
    batch_size = spec.plan_batch
    window = (batch_size or -1, *spec.example[1:])  # -1: OpenVINO's free dimension
    plans: dict[tuple[int, ...], Any] = {}
    lock = threading.Lock()
    properties = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": _OPENVINO_PRECISION[precision],
    }

    def plan(shape: tuple[int, ...]) -> Any:
        if shape not in plans:
            for old in [s for s in plans if s != window]:
                del plans[old]  # the previous volume's plan and its buffers
            model.reshape({_INPUT: list(shape)})
            compiled = core.compile_model(model, "CPU", properties)
            _check_plan_precision(compiled, precision)
            plans[shape] = (compiled, compiled.create_infer_request())
        return plans[shape]

    def infer(batch: np.ndarray, shape: tuple[int, ...] | None = None) -> np.ndarray:
        compiled, request = plan(shape or batch.shape)
        return np.array(request.infer({_INPUT: batch})[compiled.output(0)], dtype=np.float32)

    def forward(x: torch.Tensor) -> torch.Tensor:
        windows = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        with lock:
            if windows.shape[1:] != window[1:]:  # a whole volume
                return torch.from_numpy(infer(windows))
            if batch_size is None:  # one plan of a free batch: the whole batch in one call
                return torch.from_numpy(infer(windows, window))
            outs = []
            for start in range(0, len(windows), batch_size):
                batch = windows[start : start + batch_size]
                n = len(batch)
                if n < batch_size:
                    pad = np.zeros((batch_size - n, *batch.shape[1:]), dtype=np.float32)
                    batch = np.concatenate([batch, pad])
                outs.append(infer(batch)[:n])
        return torch.from_numpy(np.concatenate(outs))

    return forward


def _check_plan_precision(compiled: Any, precision: Precision) -> None:
    ran = openvino_precision(compiled)
    if ran == _OPENVINO_PRECISION[precision]:
        return
    if precision == "f32":  # never expected: the hint is explicit
        raise MedsegError(f"OpenVINO compiled an {ran} plan where f32 was asked for")
    log.warning("infer.precision %s is not native on this CPU: OpenVINO runs %s", precision, ran)
