"""Inference engines: the exported graph next to the weights, chosen at load time.

One tiny model (seeded weights) is exported once per module; every engine segments the same
small synthetic case through :func:`medseg.inference.infer.segment_case`, and the PyTorch path is
the reference they are held to.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from monai.inferers import sliding_window_inference
from pydantic import ValidationError

from medseg.config import InferConfig, MedsegConfig
from medseg.core.errors import InvalidInput, MedsegError
from medseg.core.storage import Storage, join
from medseg.data.synth import make_case
from medseg.inference.engine import GRAPH_FILE
from medseg.inference.infer import CaseSegmentation, load_model, segment_case
from medseg.inference.precision import autocast
from medseg.registry.export import export_model
from medseg.registry.register import register
from medseg.tasks.networks import build_network
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
def sliding(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """:func:`exported` with ``infer.window: sliding``."""
    folder = Path(shutil.copytree(exported, tmp_path_factory.mktemp("sliding") / "model"))
    _set_infer(folder, window="sliding")
    return folder


@pytest.fixture(scope="module")
def references(
    exported: Path, sliding: Path, case: tuple[np.ndarray, np.ndarray]
) -> dict[str, CaseSegmentation]:
    """The PyTorch engine's answer per ``infer.window``."""
    return {
        window: segment_case(
            load_model(str(folder), Storage(), device="cpu", engine="torch"), *case
        )
        for window, folder in (("volume", exported), ("sliding", sliding))
    }


def _copy(exported: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "model"))


def _set_infer(folder: Path, **infer: object) -> None:
    cfg = MedsegConfig.model_validate(yaml.safe_load((folder / "model.yaml").read_text()))
    cfg = cfg.model_copy(update={"infer": cfg.infer.model_copy(update=infer)})
    (folder / "model.yaml").write_text(cfg.to_yaml())


@pytest.mark.parametrize("window", ["volume", "sliding"])
@pytest.mark.parametrize("engine", GRAPH_ENGINES)
def test_graph_engines_give_the_reference_label_map(
    exported: Path,
    sliding: Path,
    case: tuple[np.ndarray, np.ndarray],
    references: dict[str, CaseSegmentation],
    engine: str,
    window: str,
) -> None:
    """One exported graph (free spatial sizes) runs whole volumes and sliding windows."""
    folder = exported if window == "volume" else sliding
    reference = references[window]
    seg = load_model(str(folder), Storage(), device="cpu", engine=engine)  # type: ignore[arg-type]
    assert seg.engine == engine and seg.forward is not None
    assert seg.cfg.infer.window == window
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
    with caplog.at_level(logging.INFO, logger="medseg.inference.engine"):
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
    for bad_infer in ({"window": "tiles"}, {"volume_max_voxels": 0}):
        with pytest.raises(ValidationError, match=next(iter(bad_infer))):
            InferConfig(**bad_infer)  # type: ignore[arg-type]
    bad.write_text("infer:\n  window: tiles\n")
    with pytest.raises(InvalidInput, match=r"bad\.yaml: infer\.window"):
        MedsegConfig.load(bad)
    assert InferConfig().window == "volume"
    with pytest.raises(ValidationError, match="amp_dtype"):
        MedsegConfig.model_validate({"train": {"amp_dtype": "float8"}})


def test_the_cpu_path_is_plain_float32(exported: Path, sliding: Path) -> None:
    """amp on (the default) changes nothing on the CPU; channels-last gives the same answer.

    ``volume``: the network on the volume zero-padded at its far ends to a multiple of 8, cut
    back; ``sliding``: MONAI's sliding-window inference, exactly.
    """
    image = torch.rand(4, 45, 38, 21)  # no size a multiple of 8: the padding is exercised
    for folder in (exported, sliding):
        seg = load_model(str(folder), Storage(), device="cpu", engine="torch")
        assert seg.cfg.infer.amp
        with autocast(torch.device("cpu"), True, "float16"):
            assert not torch.is_autocast_enabled("cpu")
        infer = seg.cfg.infer
        with torch.no_grad():
            if infer.window == "volume":
                padded = torch.zeros(1, 4, 48, 40, 24)
                padded[0, :, :45, :38, :21] = image
                plain = seg.net(padded)[..., :45, :38, :21]
            else:
                plain = sliding_window_inference(
                    image.unsqueeze(0),
                    roi_size=infer.roi_size,
                    sw_batch_size=infer.sw_batch_size,
                    predictor=seg.net,
                    overlap=infer.overlap,
                    mode="gaussian",
                )
        assert isinstance(plain, torch.Tensor)
        probs = seg.probabilities(image)
        assert probs.dtype == torch.float32 and probs.shape == (3, 45, 38, 21)
        assert torch.equal(probs, torch.sigmoid(plain[0])), infer.window
        seg.cfg = seg.cfg.model_copy(
            update={"infer": infer.model_copy(update={"channels_last": True})}
        )
        assert torch.allclose(seg.probabilities(image), probs, atol=1e-5)


def test_one_window_is_the_sliding_answer_where_one_window_covers_the_volume(
    exported: Path, sliding: Path
) -> None:
    """A volume of exactly ``roi_size``: one sliding window, no padding; both paths agree."""
    image = torch.rand(4, *MedsegConfig.model_validate(TINY).infer.roi_size)
    volume = load_model(str(exported), Storage(), device="cpu", engine="torch")
    windows = load_model(str(sliding), Storage(), device="cpu", engine="torch")
    assert volume.one_window(tuple(image.shape[1:]))
    assert not windows.one_window(tuple(image.shape[1:]))
    assert torch.allclose(volume.probabilities(image), windows.probabilities(image), atol=1e-6)


def test_a_volume_above_volume_max_voxels_runs_in_sliding_windows(
    exported: Path, sliding: Path, tmp_path: Path
) -> None:
    capped = _copy(exported, tmp_path)
    _set_infer(capped, volume_max_voxels=48 * 40 * 24 - 1)  # the padded size of the image
    image = torch.rand(4, 45, 38, 21)
    seg = load_model(str(capped), Storage(), device="cpu", engine="torch")
    assert not seg.one_window((45, 38, 21)) and seg.one_window((40, 40, 24))
    windows = load_model(str(sliding), Storage(), device="cpu", engine="torch")
    assert torch.equal(seg.probabilities(image), windows.probabilities(image))


def test_openvino_plans_each_volume_shape(exported: Path) -> None:
    """Volumes of new shapes, then the first again: each answer is PyTorch's."""
    seg = load_model(str(exported), Storage(), device="cpu", engine="openvino")
    ref = load_model(str(exported), Storage(), device="cpu", engine="torch")
    for shape in [(45, 38, 21), (30, 30, 30), (45, 38, 21)]:
        image = torch.rand(4, *shape)
        diff = (seg.probabilities(image) - ref.probabilities(image)).abs().max()
        assert diff <= PROB_TOL, shape


@pytest.mark.parametrize("engine", GRAPH_ENGINES)
def test_a_graph_of_fixed_window_size_is_refused_for_whole_volumes(
    exported: Path, tmp_path: Path, engine: str
) -> None:
    """A graph exported for fixed windows (before infer.window) cannot run whole volumes."""
    import onnx

    old = _copy(exported, tmp_path)
    graph = onnx.load(old / GRAPH_FILE)
    roi = MedsegConfig.model_validate(TINY).infer.roi_size
    for axis, size in zip(graph.graph.input[0].type.tensor_type.shape.dim[2:], roi, strict=True):
        axis.dim_value = size
    onnx.save(graph, old / GRAPH_FILE)
    with pytest.raises(MedsegError, match=r"exported for windows of \[32, 32, 16\] voxels only"):
        load_model(str(old), Storage(), device="cpu", engine=engine)  # type: ignore[arg-type]
    _set_infer(old, window="sliding")
    image = torch.rand(4, 40, 40, 20)
    seg = load_model(str(old), Storage(), device="cpu", engine=engine)  # type: ignore[arg-type]
    ref = load_model(str(old), Storage(), device="cpu", engine="torch")
    assert (seg.probabilities(image) - ref.probabilities(image)).abs().max() <= PROB_TOL


def _finished_run(storage: Storage, bucket: str, run_id: str, seed: int) -> str:
    """A training run's model (seeded tiny weights, config, lineage) as training leaves it."""
    run_model = join(bucket, "runs", run_id, "model")
    cfg = MedsegConfig.model_validate(TINY)
    torch.manual_seed(seed)
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
    return run_model


def test_register_exports_the_graph_next_to_the_weights(storage: Storage, bucket: str) -> None:
    _finished_run(storage, bucket, "r1", seed=0)
    card = register(storage, bucket, "r1", "tiny", export=True)
    version = join(bucket, "models", "tiny", card["version"])
    # The card records the graph's sha256 and the stored graph matches it (get_bytes verifies).
    storage.get_bytes(join(version, GRAPH_FILE), sha256=card["files"][GRAPH_FILE])
    seg = load_model(version, storage, device="cpu")
    assert seg.engine == "openvino"
    plain = register(storage, bucket, "r1", "tiny")  # without export: weights only
    assert GRAPH_FILE not in plain["files"]


def test_a_copy_of_a_version_is_served_only_as_its_card_records(
    storage: Storage, bucket: str, tmp_path: Path
) -> None:
    """KServe's ``/mnt/models`` is a copy of a registered version: checked against its card."""
    run_model = _finished_run(storage, bucket, "r2", seed=1)
    card = register(storage, bucket, "r2", "carded", export=True)
    version = join(bucket, "models", "carded", card["version"])
    served = tmp_path / "mnt-models"  # what the storage initializer writes
    for obj in storage.list(version):
        storage.get_file(obj.uri, served / obj.uri.rsplit("/", 1)[1])
    assert load_model(str(served), Storage(), device="cpu").engine == "openvino"

    # A registered version is never re-exported: the export is not byte-for-byte reproducible.
    with pytest.raises(MedsegError, match=r"model.onnx is recorded in model_card.json"):
        export_model(version, storage)
    assert storage.get_bytes(join(version, GRAPH_FILE), sha256=card["files"][GRAPH_FILE])

    # A config that loads as well as the recorded one, but is not it, is refused by name.
    good_yaml = (served / "model.yaml").read_bytes()
    cfg = MedsegConfig.model_validate(TINY)
    other = cfg.model_copy(update={"infer": cfg.infer.model_copy(update={"threshold": 0.3})})
    (served / "model.yaml").write_text(other.to_yaml())
    with pytest.raises(MedsegError, match=r"mnt-models/model.yaml is not the file model_card"):
        load_model(str(served), Storage(), device="cpu")
    (served / "model.yaml").write_bytes(good_yaml)

    # A file the card lists must be there: no quiet fall-back to another engine.
    (served / GRAPH_FILE).unlink()
    with pytest.raises(MedsegError, match=r"model.onnx is missing, and model_card.json lists it"):
        load_model(str(served), Storage(), device="cpu")

    # A training run's model is checked against its lineage the same way.
    storage.put_bytes(join(run_model, "model.yaml"), other.to_yaml().encode())
    with pytest.raises(MedsegError, match=r"model.yaml is not the file lineage.json records"):
        load_model(run_model, storage, device="cpu")


def test_bf16_is_an_explicit_openvino_setting(
    exported: Path,
    tmp_path: Path,
    case: tuple[np.ndarray, np.ndarray],
    references: dict[str, CaseSegmentation],
) -> None:
    """``infer.precision: bf16`` runs on OpenVINO (near f32); other engines refuse it by name."""
    folder = _copy(exported, tmp_path)
    _set_infer(folder, precision="bf16")
    got = segment_case(load_model(str(folder), Storage(), device="cpu", engine="openvino"), *case)
    # bf16 keeps 8 bits of mantissa: probabilities stay close to f32, not within PROB_TOL.
    assert np.abs(got.probabilities - references["volume"].probabilities).max() < 0.05
    for engine in ("torch", "onnxruntime"):
        with pytest.raises(
            MedsegError,
            match=f"precision 'bf16' is run by the openvino engine "
            f"only, and this model runs on {engine}",
        ):
            load_model(str(folder), Storage(), device="cpu", engine=engine)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        InferConfig.model_validate({"precision": "f16"})


def test_the_openvino_engine_sends_no_telemetry(exported: Path, tmp_path: Path) -> None:
    """OpenVINO's conversion tool sends a usage event on import and writes a client id under
    ``$HOME/intel``; the engine runs without it: nothing is written there, the tool is not loaded.
    """
    home = tmp_path / "home"
    home.mkdir()
    script = (
        "import sys, torch\n"
        "from medseg.core.storage import Storage\n"
        "from medseg.inference.infer import load_model\n"
        f"seg = load_model({str(exported)!r}, Storage(), device='cpu', engine='openvino')\n"
        "assert seg.probabilities(torch.rand(4, 20, 20, 12)).shape == (3, 20, 20, 12)\n"
        "print(sys.modules.get('openvino.tools.ovc'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**env, "HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "None"
    assert not (home / "intel").exists()  # no openvino_ga_cid, no stats
