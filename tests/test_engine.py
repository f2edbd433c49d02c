"""Inference engines: the exported graph next to the weights, chosen at load time.

One tiny model (seeded weights) is exported once per module; every engine segments the same
small synthetic case through :func:`medseg.infer.segment_case`, and the PyTorch path is the
reference they are held to.
"""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from pydantic import ValidationError

from medseg.config import InferConfig, MedsegConfig
from medseg.engine import GRAPH_FILE, export_model
from medseg.errors import InvalidInput, MedsegError
from medseg.infer import CaseSegmentation, load_model, segment_case
from medseg.model import build_network
from medseg.precision import autocast
from medseg.register import register
from medseg.storage import Storage, join
from medseg.synth import make_case
from tests.conftest import SHAPE

TINY = {
    "model": {"init_filters": 8},
    "infer": {"roi_size": [32, 32, 16], "sw_batch_size": 2},
}
#: Exported graphs compute in float32 like PyTorch, in another order: probabilities agree to this.
PROB_TOL = 1e-4
GRAPH_ENGINES = ("onnxruntime", "openvino")


def _write_model(folder: Path, seed: int, cfg: dict[str, object] | None = None) -> Path:
    config = MedsegConfig.model_validate(cfg or TINY)
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(build_network(config.model).state_dict(), folder / "model.pt")
    (folder / "model.yaml").write_text(config.to_yaml())
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model artifact with its exported graph (read-only: copy to modify)."""
    folder = _write_model(tmp_path_factory.mktemp("engine") / "model", seed=3)
    export_model(str(folder), Storage())
    return folder


@pytest.fixture(scope="module")
def case() -> tuple[np.ndarray, np.ndarray]:
    c = make_case(0, shape=SHAPE, seed=5)
    return c.image, c.affine


@pytest.fixture(scope="module")
def reference(exported: Path, case: tuple[np.ndarray, np.ndarray]) -> CaseSegmentation:
    seg = load_model(str(exported), Storage(), device="cpu", engine="torch")
    return segment_case(seg, *case)


def _copy(exported: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "model"))


@pytest.mark.parametrize("engine", GRAPH_ENGINES)
def test_graph_engines_give_the_reference_label_map(
    exported: Path,
    case: tuple[np.ndarray, np.ndarray],
    reference: CaseSegmentation,
    engine: str,
) -> None:
    seg = load_model(str(exported), Storage(), device="cpu", engine=engine)  # type: ignore[arg-type]
    assert seg.engine == engine and seg.forward is not None
    got = segment_case(seg, *case)
    assert np.abs(got.probabilities - reference.probabilities).max() <= PROB_TOL
    assert np.array_equal(got.regions, reference.regions)
    assert reference.regions[1].sum() > 0  # the case has voxels in WT: a real comparison
    assert np.array_equal(got.label_map(), reference.label_map())
    assert got.volumes_ml == reference.volumes_ml


def test_auto_runs_the_graph_when_there_is_one_and_torch_when_not(
    exported: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert load_model(str(exported), Storage(), device="cpu").engine == "openvino"
    plain = _copy(exported, tmp_path)
    (plain / GRAPH_FILE).unlink()
    with caplog.at_level(logging.INFO, logger="medseg.engine"):
        seg = load_model(str(plain), Storage(), device="cpu")
    assert seg.engine == "torch" and seg.forward is None
    assert f"has no {GRAPH_FILE}: inference runs on PyTorch" in caplog.text


@pytest.mark.parametrize("engine", GRAPH_ENGINES)
def test_a_graph_engine_asked_for_without_a_graph_is_an_error(
    exported: Path, tmp_path: Path, engine: str
) -> None:
    plain = _copy(exported, tmp_path)
    (plain / GRAPH_FILE).unlink()
    with pytest.raises(MedsegError, match=f"engine '{engine}' needs {GRAPH_FILE}"):
        load_model(str(plain), Storage(), device="cpu", engine=engine)  # type: ignore[arg-type]


@pytest.mark.parametrize("engine", ["auto", *GRAPH_ENGINES])
def test_a_corrupt_graph_is_refused_by_name(exported: Path, tmp_path: Path, engine: str) -> None:
    broken = _copy(exported, tmp_path)
    data = (broken / GRAPH_FILE).read_bytes()
    (broken / GRAPH_FILE).write_bytes(data[: len(data) // 2])  # a torn upload
    with pytest.raises(MedsegError, match=rf"{broken}/model\.onnx is not a valid ONNX model"):
        load_model(str(broken), Storage(), device="cpu", engine=engine)  # type: ignore[arg-type]


def test_a_graph_of_other_weights_is_refused(exported: Path, tmp_path: Path) -> None:
    other = _copy(exported, tmp_path)
    _write_model(other, seed=4)  # new weights, the old graph left behind
    with pytest.raises(MedsegError, match="exported from other weights"):
        load_model(str(other), Storage(), device="cpu")


def test_the_engine_setting_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="engine"):
        InferConfig(engine="tensorrt")  # type: ignore[arg-type]
    bad = tmp_path / "bad.yaml"
    bad.write_text("infer:\n  engine: tensorrt\n")
    with pytest.raises(InvalidInput, match=r"bad\.yaml: infer\.engine"):
        MedsegConfig.load(bad)
    with pytest.raises(ValidationError, match="amp_dtype"):
        MedsegConfig.model_validate({"train": {"amp_dtype": "float8"}})


def test_the_cpu_path_is_plain_float32(exported: Path, case: tuple[np.ndarray, np.ndarray]) -> None:
    """amp on (the default) changes nothing on the CPU; channels-last gives the same answer."""
    seg = load_model(str(exported), Storage(), device="cpu", engine="torch")
    assert seg.cfg.infer.amp
    with autocast(torch.device("cpu"), True, "float16"):
        assert not torch.is_autocast_enabled("cpu")
    image = torch.rand(4, *SHAPE)
    with torch.no_grad():
        plain = sliding_window_inference(
            image.unsqueeze(0),
            roi_size=seg.cfg.infer.roi_size,
            sw_batch_size=seg.cfg.infer.sw_batch_size,
            predictor=seg.net,
            overlap=seg.cfg.infer.overlap,
            mode="gaussian",
        )
    assert isinstance(plain, torch.Tensor)
    probs = seg.probabilities(image)
    assert probs.dtype == torch.float32
    assert torch.equal(probs, torch.sigmoid(plain[0]))
    cfg = seg.cfg.model_copy(
        update={"infer": seg.cfg.infer.model_copy(update={"channels_last": True})}
    )
    seg.cfg = cfg
    assert torch.allclose(seg.probabilities(image), probs, atol=1e-5)


def test_register_exports_the_graph_next_to_the_weights(storage: Storage, bucket: str) -> None:
    run_model = join(bucket, "runs", "r1", "model")
    cfg = MedsegConfig.model_validate(TINY)
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(build_network(cfg.model).state_dict(), buf)
    pt = storage.put_bytes(join(run_model, "model.pt"), buf.getvalue())
    yml = storage.put_bytes(join(run_model, "model.yaml"), cfg.to_yaml().encode())
    lineage = {
        "files": {"model.pt": pt.sha256, "model.yaml": yml.sha256},
        "dataset": {"store": bucket, "name": "d", "version": "0123456789abcdef"},
        "preprocessing": "fp",
        "best": {"dice_mean": 0.5},
    }
    storage.put_json(join(run_model, "lineage.json"), lineage)
    card = register(storage, bucket, "r1", "tiny", export=True)
    version = join(bucket, "models", "tiny", card["version"])
    # The card records the graph's sha256 and the stored graph matches it (get_bytes verifies).
    storage.get_bytes(join(version, GRAPH_FILE), sha256=card["files"][GRAPH_FILE])
    seg = load_model(version, storage, device="cpu")
    assert seg.engine == "openvino"
    plain = register(storage, bucket, "r1", "tiny")  # without export: weights only
    assert GRAPH_FILE not in plain["files"]
