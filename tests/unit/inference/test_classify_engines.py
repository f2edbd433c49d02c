"""The skin-lesion classifier on the CPU engines: its exported graph, chosen at load time.

The tiny skin model of the session (``skin_model``: one epoch on 42 synthetic images of 32 px) is
registered with its graph once per module; every engine classifies the same synthetic
dermoscopy JPEGs through :func:`medseg.inference.classify.classify_images` (batch prediction and the
server call it), and PyTorch is the reference they are held to.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError

from medseg.config import MedsegConfig
from medseg.core.errors import MedsegError
from medseg.core.settings import ServerLimits
from medseg.core.storage import Storage, join
from medseg.inference.classify import classify_images
from medseg.inference.engine import GRAPH_FILE
from medseg.inference.infer import load_model
from medseg.inference.predict import predict
from medseg.io.images import decode_image
from medseg.registry.register import register
from medseg.serving.client import infer, serialize_bytes
from medseg.tasks.skin_classes import CLASSES
from tests.conftest import SKIN_SIZE, SkinModel, model_server
from tests.unit.inference.test_engine import GRAPH_ENGINES, PROB_TOL


@pytest.fixture(scope="module")
def version(skin_model: SkinModel) -> str:
    """The skin model registered with its exported graph (``models/skin/vN``)."""
    card = register(skin_model.storage, skin_model.bucket, skin_model.run_id, "skin", export=True)
    assert GRAPH_FILE in card["files"]
    return join(skin_model.bucket, "models", "skin", card["version"])


@pytest.fixture(scope="module")
def jpegs(ham: Path) -> list[Path]:
    """Eight of the synthetic HAM10000 JPEGs (600×450)."""
    return sorted((ham / "HAM10000_images_part_1").glob("*.jpg"))[:8]


@pytest.fixture(scope="module")
def pixels(jpegs: list[Path]) -> list[np.ndarray]:
    return [decode_image(f.read_bytes(), f.name, ServerLimits()) for f in jpegs]


@pytest.fixture(scope="module")
def reference(skin_model: SkinModel, version: str, pixels: list[np.ndarray]) -> np.ndarray:
    """PyTorch's probabilities of :func:`pixels`."""
    seg = load_model(version, skin_model.storage, device="cpu", engine="torch")
    assert seg.engine == "torch" and seg.forward is None
    probs = classify_images(seg, pixels)
    # The images get different answers: agreement below is a comparison, not a constant.
    assert np.ptp(probs, axis=0).max() > 100 * PROB_TOL
    return probs


def _local_copy(storage: Storage, version: str, folder: Path, **infer: object) -> Path:
    """The version's weights and graph in a folder, its config with ``infer`` fields changed.

    No card comes along: a changed ``model.yaml`` is no longer the registered file.
    """
    for name in ("model.pt", GRAPH_FILE):
        storage.get_file(join(version, name), folder / name)
    cfg = MedsegConfig.from_yaml(storage.get_bytes(join(version, "model.yaml")), "model.yaml")
    cfg = cfg.model_copy(update={"infer": cfg.infer.model_copy(update=infer)})
    (folder / "model.yaml").write_text(cfg.to_yaml())
    return folder


def test_the_graph_takes_a_free_batch_of_images_of_the_task_size(
    skin_model: SkinModel, version: str
) -> None:
    import onnx

    graph = onnx.load_from_string(skin_model.storage.get_bytes(join(version, GRAPH_FILE)))

    def dims(value: onnx.ValueInfoProto) -> list[int | str]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert dims(graph.graph.input[0]) == ["batch", 3, SKIN_SIZE, SKIN_SIZE]
    assert dims(graph.graph.output[0]) == ["batch", len(CLASSES)]


@pytest.mark.parametrize("engine", GRAPH_ENGINES)
def test_graph_engines_give_the_torch_probabilities(
    skin_model: SkinModel,
    version: str,
    pixels: list[np.ndarray],
    reference: np.ndarray,
    engine: str,
) -> None:
    seg = load_model(version, skin_model.storage, device="cpu", engine=engine)  # type: ignore[arg-type]
    assert seg.engine == engine and seg.forward is not None
    probs = classify_images(seg, pixels)
    assert probs.dtype == np.float32 and probs.shape == (len(pixels), len(CLASSES))
    assert np.abs(probs - reference).max() <= PROB_TOL
    assert np.array_equal(probs.argmax(axis=1), reference.argmax(axis=1))
    # One image alone gets its answer in the batch (OpenVINO: one plan of a free batch size).
    assert np.abs(classify_images(seg, pixels[3:4]) - probs[3:4]).max() <= 1e-6


def test_auto_runs_a_registered_classifier_on_openvino(skin_model: SkinModel, version: str) -> None:
    """Without a GPU, ``auto`` runs the graph a registered version carries."""
    assert load_model(version, skin_model.storage, device="cpu").engine == "openvino"


def test_batch_prediction_runs_on_the_loaded_engine(
    skin_model: SkinModel, version: str, jpegs: list[Path], reference: np.ndarray, tmp_path: Path
) -> None:
    seg = load_model(version, skin_model.storage, device="cpu", engine="onnxruntime")
    folder = tmp_path / "images"
    folder.mkdir()
    for f in jpegs:
        shutil.copy(f, folder / f.name)
    done = predict(
        version, str(tmp_path / "out"), paths=[str(folder)], storage=Storage(), segmenter=seg
    )
    by_id = {c["case_id"]: c for c in done.cases}
    got = np.array([[by_id[f.stem]["probabilities"][c] for c in CLASSES] for f in jpegs])
    assert np.abs(got - reference).max() <= PROB_TOL
    assert [by_id[f.stem]["label"] for f in jpegs] == [CLASSES[i] for i in reference.argmax(1)]


def test_precision_rules_are_the_segmenters(
    skin_model: SkinModel, version: str, pixels: list[np.ndarray], reference: np.ndarray,
    tmp_path: Path,
) -> None:  # fmt: skip
    """``bf16`` is an explicit OpenVINO setting (near f32); other engines refuse it by name."""
    folder = _local_copy(skin_model.storage, version, tmp_path, precision="bf16")
    seg = load_model(str(folder), Storage(), device="cpu", engine="openvino")
    assert np.abs(classify_images(seg, pixels) - reference).max() < 0.05
    for engine in ("torch", "onnxruntime"):
        with pytest.raises(
            MedsegError, match=f"'bf16' is run by the openvino engine only.*{engine}"
        ):
            load_model(str(folder), Storage(), device="cpu", engine=engine)
    with pytest.raises(ValidationError):
        MedsegConfig.model_validate({"infer": {"precision": "f16"}})


def test_channels_last_runs_the_2d_classifier_in_the_4d_layout(
    skin_model: SkinModel, version: str, pixels: list[np.ndarray], reference: np.ndarray,
    tmp_path: Path,
) -> None:  # fmt: skip
    """``infer.channels_last`` lays a 2D network's weights out as ``torch.channels_last``."""
    folder = _local_copy(skin_model.storage, version, tmp_path, channels_last=True)
    seg = load_model(str(folder), Storage(), device="cpu", engine="torch")
    convs = [m.weight for m in seg.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not convs[0].is_contiguous()  # the layout really changed (C > 1, kernel > 1)
    probs = classify_images(seg, pixels)
    assert np.abs(probs - reference).max() <= PROB_TOL
    assert np.array_equal(probs.argmax(axis=1), reference.argmax(axis=1))


@pytest.mark.parametrize("engine", GRAPH_ENGINES)
def test_a_graph_of_another_image_size_is_refused_by_name(
    skin_model: SkinModel, version: str, tmp_path: Path, engine: str
) -> None:
    folder = _local_copy(skin_model.storage, version, tmp_path)
    raw = yaml.safe_load((folder / "model.yaml").read_text())
    raw["data"]["image_size"] = [48, 48]
    (folder / "model.yaml").write_text(MedsegConfig.model_validate(raw).to_yaml())
    with pytest.raises(
        MedsegError,
        match=r"model\.onnx was exported for inputs of \[32, 32\] and the model's config "
        r"\(skin-lesion-classification\) runs inputs of \[48, 48\]",
    ):
        load_model(str(folder), Storage(), device="cpu", engine=engine)  # type: ignore[arg-type]


def test_the_server_classifies_on_onnxruntime(
    skin_model: SkinModel, version: str, jpegs: list[Path], reference: np.ndarray, tmp_path: Path
) -> None:
    """``infer.engine: onnxruntime`` in ``model.yaml``: the server answers v2 from the graph."""
    folder = _local_copy(skin_model.storage, version, tmp_path / "model", engine="onnxruntime")
    ours = load_model(str(folder), Storage(), device="cpu")
    assert ours.engine == "onnxruntime"
    pixels = [decode_image(f.read_bytes(), f.name, ServerLimits()) for f in jpegs]
    want = classify_images(ours, pixels)
    blobs = [f.read_bytes() for f in jpegs]
    image = {"name": "image", "datatype": "BYTES", "shape": [len(blobs)], "parameters": {}}
    with model_server(folder, tmp_path / "server.log") as server:
        outputs, _ = infer(
            server.url, "medseg", image, serialize_bytes(blobs), {}, ["probabilities"], 120
        )
        maps = Path(f"/proc/{server.pid}/maps").read_text()
    got = outputs["probabilities"].array()
    assert got.shape == (len(blobs), len(CLASSES))
    np.testing.assert_allclose(got, want, atol=1e-6)  # the same engine as in-process
    assert np.abs(got - reference).max() <= PROB_TOL
    assert "libonnxruntime" in maps and "libopenvino" not in maps  # the engine that answered
