"""Batch prediction and the label-map evaluation: hand-built cases and models, real MinIO.

The hand-built model is a real network whose weights are set by hand: a 1×1×1 convolution that
turns input channel t1 into the TC logit, t1gd into WT and t2 into ET. A case whose t1/t1gd/t2
volumes are boxes therefore gets exactly those boxes as region outputs, and a test can place a
predicted ET outside the predicted TC.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medseg.cli import app
from medseg.config import CHANNELS, REGIONS, MedsegConfig
from medseg.core.storage import Storage, join
from medseg.data.ingest import ingest
from medseg.evaluation.evaluate import evaluate, score_label_maps
from medseg.inference.infer import Segmenter
from medseg.inference.predict import predict
from medseg.io.nifti import decode
from medseg.tasks.labels import get_convention
from tests.conftest import write_tiny_model

GRID = (16, 16, 16)
#: The hand-built case: true regions, and the boxes the model will predict (ET partly outside TC).
TRUE_WT, TRUE_TC, TRUE_ET = (slice(2, 14),) * 3, (slice(4, 10),) * 3, (slice(5, 9),) * 3
STRAY_ET = (slice(11, 13), slice(5, 9), slice(5, 9))  # inside WT, outside TC: 32 voxels


def _hand_built(nesting: str, channels: tuple[str, ...] = CHANNELS) -> Segmenter:
    cfg = MedsegConfig.model_validate(
        {
            "data": {"channels": list(channels), "normalize_nonzero": False},
            "infer": {"roi_size": list(GRID), "nesting": nesting},
        }
    )
    net = torch.nn.Conv3d(4, 3, kernel_size=1)
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()
        for region, channel in (("TC", "t1"), ("WT", "t1gd"), ("ET", "t2")):
            net.weight[REGIONS.index(region), channels.index(channel)] = 20.0
    return Segmenter(cfg, net.eval(), torch.device("cpu"))


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


def _box(shape: tuple[int, ...], *boxes: tuple[slice, ...]) -> np.ndarray:
    out = np.zeros(shape, dtype=np.float32)
    for b in boxes:
        out[b] = 1.0
    return out


def _write_case(root: Path, case_id: str, affine: np.ndarray, shape: tuple[int, ...]) -> None:
    """A BraTS 2021 case folder: t1 = predicted TC box, t1ce = WT, t2 = ET (with the stray
    part), flair = the brain; the label map holds the true regions."""
    volumes = {
        "t1": _box(shape, TRUE_TC),
        "t1ce": _box(shape, TRUE_WT),
        "t2": _box(shape, TRUE_ET, STRAY_ET),
        "flair": _box(shape, (slice(1, -1),) * 3) * 2.0,
    }
    for suffix, data in volumes.items():
        _save(data, affine, root / case_id / f"{case_id}_{suffix}.nii.gz")
    label = np.zeros(shape, dtype=np.uint8)
    label[TRUE_WT], label[TRUE_TC], label[TRUE_ET] = 2, 1, 4
    _save(label, affine, root / case_id / f"{case_id}_seg.nii.gz")


@pytest.fixture(scope="module")
def hand_dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The hand-built case (and a twin) ingested into a local store: (store, NAME@VERSION)."""
    root = tmp_path_factory.mktemp("hand")
    for case_id in ("BraTS2021_90000", "BraTS2021_90001"):
        _write_case(root / "raw", case_id, np.eye(4), GRID)
    store = str(root / "store")
    result = ingest(str(root / "raw"), "hand", store, storage=Storage())
    return store, str(result.ref)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.mark.parametrize(
    ("nesting", "expected"),
    [
        # union: the stray ET becomes TC in the label map, TC Dice 2·216/(248+216)
        ("union", {"TC": 432 / 464, "WT": 1.0, "ET": 2 * 64 / (96 + 64)}),
        # intersect: ET outside TC is dropped before the label map is cut
        ("intersect", {"TC": 1.0, "WT": 1.0, "ET": 1.0}),
    ],
)
def test_metric_is_that_of_the_label_map(
    hand_dataset: tuple[str, str], tmp_path: Path, nesting: str, expected: dict[str, float]
) -> None:
    """Predicted ET lies outside predicted TC: the score is the served label map's."""
    store, spec = hand_dataset
    seg = _hand_built(nesting)
    storage = Storage()
    pred = predict("hand-built", str(tmp_path / "pred"), dataset=spec, split="all", store=store,
                   storage=storage, segmenter=seg)  # fmt: skip
    assert not pred.failed and len(pred.cases) == 2
    result = evaluate("hand-built", dataset=spec, store=store, split="all", storage=storage,
                      segmenter=seg, predictions=pred.out, out=str(tmp_path / "eval"))  # fmt: skip
    case = result.cases[0]
    assert case.dice == pytest.approx(expected, abs=1e-6)
    # the number is recomputed from the label map file the product wrote, by BraTS's regions
    written = decode((tmp_path / "pred" / pred.cases[0]["key"]).read_bytes(), "map", None).data
    regions = get_convention("brats2021").to_regions(written).astype(bool)
    truth = np.zeros((3, *GRID), dtype=bool)
    truth[0][TRUE_TC], truth[1][TRUE_WT], truth[2][TRUE_ET] = True, True, True
    for i, region in enumerate(REGIONS):
        assert case.dice[region] == pytest.approx(_dice(regions[i], truth[i]), abs=1e-6)
    # and it is not the channel metric, which scores TC 1.0 and ET 0.8 whatever the nesting
    channel = {"TC": 1.0, "WT": 1.0, "ET": 0.8}
    assert any(abs(case.dice[r] - channel[r]) > 0.05 for r in REGIONS)
    # the volumes table agrees with the label map (1 mm voxels)
    assert pred.cases[0]["volumes_ml"]["TC"] == pytest.approx(regions[0].sum() / 1000)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert "TC={1,4}" in metrics["definition"] and "original grid" in metrics["definition"]
    rows = (tmp_path / "eval" / "cases.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("case,dice_mean,dice_TC")


def test_scoring_happens_on_the_original_grid(tmp_path: Path) -> None:
    """LPS affine, 1×1×1.5 mm voxels: the prediction is read on that grid, HD95 is in mm."""
    affine = np.diag([-1.0, -1.0, 1.5, 1.0])
    affine[:3, 3] = [20.0, 20.0, -12.0]
    shape = (20, 20, 16)
    case_id = "BraTS2021_91000"
    _write_case(tmp_path / "raw", case_id, affine, shape)
    store = str(tmp_path / "store")
    storage = Storage()
    spec = str(ingest(str(tmp_path / "raw"), "lps", store, storage=storage).ref)
    # batch prediction writes its label map on the case's own grid
    seg = _hand_built("intersect")
    pred = predict("m", str(tmp_path / "pred"), dataset=spec, split="all", store=store,
                   storage=storage, segmenter=seg)  # fmt: skip
    written = nib.load(str(tmp_path / "pred" / pred.cases[0]["key"]))
    assert written.shape == shape and np.allclose(written.affine, affine)  # type: ignore[attr-defined]
    assert nib.aff2axcodes(written.affine) == ("L", "P", "S")  # type: ignore[attr-defined]
    # a hand-made prediction: the true label map shifted by 2 voxels (3 mm) along z
    truth = np.asarray(nib.load(str(tmp_path / "raw" / case_id / f"{case_id}_seg.nii.gz")).dataobj)  # type: ignore[attr-defined]
    shifted = np.zeros_like(truth)
    shifted[:, :, 2:] = truth[:, :, :-2]
    from medseg.io.nifti import encode_label_map

    (tmp_path / "pred" / pred.cases[0]["key"]).write_bytes(encode_label_map(shifted, affine))
    result = evaluate("m", dataset=spec, store=store, split="all", storage=storage,
                      segmenter=seg, predictions=pred.out, out=str(tmp_path / "eval"))  # fmt: skip
    (case,) = result.cases
    # WT is a 12-voxel box in z: overlap 10 of 12 slices; its far faces lie 2 voxels = 3 mm away
    assert case.dice["WT"] == pytest.approx(10 / 12)
    assert case.hd95["WT"] == pytest.approx(3.0)
    assert case.hd95["ET"] == pytest.approx(3.0)
    direct = score_label_maps(case_id, shifted, "brats2021", truth, "brats2021", (1.0, 1.0, 1.5))
    assert result.cases[0].dice == pytest.approx(direct.dice)
    # a prediction on another grid is refused, naming the case
    other = np.diag([1.0, 1.0, 1.0, 1.0])
    (tmp_path / "pred" / pred.cases[0]["key"]).write_bytes(encode_label_map(shifted, other))
    with pytest.raises(Exception, match=f"case {case_id}: prediction .* not on the ground truth"):
        evaluate("m", dataset=spec, store=store, split="all", storage=storage, segmenter=seg,
                 predictions=pred.out, out=str(tmp_path / "eval2"))  # fmt: skip


def test_batch_over_a_prefix_with_one_corrupt_case(
    synth_root: Path, storage: Storage, bucket: str, s3_env: None, tmp_path: Path
) -> None:
    """Every other case is written, the bad one listed with its reason, exit status 2."""
    src = tmp_path / "raw"
    shutil.copytree(synth_root / "brats2021", src)
    cases = sorted(p.name for p in src.iterdir() if p.is_dir())[:3]
    for extra in sorted(p for p in src.iterdir() if p.is_dir())[3:]:
        shutil.rmtree(extra)
    bad = cases[1]
    flair = src / bad / f"{bad}_flair.nii.gz"
    flair.write_bytes(gzip.compress(flair.read_bytes())[:500])  # truncated gzip
    prefix = join(bucket, "incoming", "raw")
    for f in sorted(src.rglob("*.nii.gz")):
        storage.put_file(join(prefix, str(f.relative_to(src))), f)
    model = write_tiny_model(tmp_path / "model")
    out = join(bucket, "preds")
    done = CliRunner().invoke(
        app, ["predict", prefix, "--model", str(model), "--out", out, "--store", bucket]
    )
    assert done.exit_code == 2, done.output
    assert bad in done.output and f"{bad}_flair.nii.gz" in done.output
    assert "corrupt gzip in" in done.output
    assert "Traceback" not in done.output
    index = storage.get_json(join(out, "predictions.json"))
    assert [c["case_id"] for c in index["cases"]] == [c for c in cases if c != bad]
    assert index["failed"][0]["case_id"] == bad
    assert index["failed"][0]["file"] == f"{bad}_flair.nii.gz"
    assert index["label_convention"] == "brats2021"
    for c in index["cases"]:
        vol = decode(storage.get_bytes(join(out, c["key"])), c["key"], None)
        original = nib.load(str(src / c["case_id"] / f"{c['case_id']}_t1.nii.gz"))
        assert vol.data.shape == original.shape  # type: ignore[attr-defined]
        assert np.allclose(vol.affine, original.affine)  # type: ignore[attr-defined]
    table = storage.get_bytes(join(out, "volumes.csv")).decode().splitlines()
    assert table[0] == "case,TC_ml,WT_ml,ET_ml" and len(table) == 3
    assert len(storage.get_json(join(out, "volumes.json"))) == 2
    # nothing of the source was touched
    assert storage.exists(join(prefix, bad, f"{bad}_flair.nii.gz"))


def test_predict_inputs_and_errors(
    synth_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One case folder, four files, an MSD folder; bad arguments end in one clear line."""
    monkeypatch.setenv("MEDSEG_ENV_FILE", str(tmp_path / "none.env"))
    model = str(write_tiny_model(tmp_path / "model"))
    runner = CliRunner()
    case = sorted((synth_root / "brats2021").iterdir())[0]
    one = runner.invoke(app, ["predict", str(case), "--model", model, "--out", str(tmp_path / "a")])
    assert one.exit_code == 0, one.output
    assert (tmp_path / "a" / "labels" / f"{case.name}.nii.gz").is_file()
    files = [str(case / f"{case.name}_{s}.nii.gz") for s in ("t1", "t1ce", "t2", "flair")]
    four = runner.invoke(app, ["predict", *files, "--model", model, "--out", str(tmp_path / "b")])
    assert four.exit_code == 0, four.output
    msd = runner.invoke(
        app, ["predict", str(synth_root / "msd"), "--model", model, "--out", str(tmp_path / "c")]
    )
    assert msd.exit_code == 0, msd.output
    index = json.loads((tmp_path / "c" / "predictions.json").read_text())
    assert index["label_convention"] == "msd" and len(index["cases"]) == 6
    for args, message in (
        ([str(case)], "give --model"),
        (["--model", model], "nothing to predict"),
        ([str(tmp_path / "nope"), "--model", model], "no such folder"),
        ([str(case), "--model", model, "--labels", "brats1999"], "unknown label convention"),
    ):
        done = runner.invoke(app, ["predict", *args, "--out", str(tmp_path / "x")])
        assert done.exit_code == 1, done.output
        assert message in done.output and "Traceback" not in done.output


@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_an_all_zero_case_is_an_empty_mask(tmp_path: Path, engine: str) -> None:
    """An all-zero case crops to no voxels: the answer is an empty mask, not the network's error."""
    from medseg.inference.infer import load_model, segment_case
    from medseg.registry.export import export_model

    folder = write_tiny_model(tmp_path / "model")
    if engine != "torch":
        export_model(str(folder), Storage())
    seg = load_model(str(folder), Storage(), device="cpu", engine=engine)  # type: ignore[arg-type]
    affine = np.diag([1.0, 1.5, 2.0, 1.0])
    out = segment_case(seg, np.zeros((len(CHANNELS), 40, 36, 30), np.float32), affine)
    assert out.regions.shape == (len(REGIONS), 40, 36, 30)
    assert not out.regions.any() and not out.probabilities.any()
    assert out.volumes_ml == dict.fromkeys(REGIONS, 0.0)
    assert out.label_map().shape == (40, 36, 30) and not out.label_map().any()
