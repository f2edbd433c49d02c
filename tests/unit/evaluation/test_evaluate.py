"""medseg evaluate on a tiny trained model: numbers, conventions, the HTML report, the gate."""

from __future__ import annotations

import base64
import itertools
import json
import math
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medseg.cli import app
from medseg.config import REGIONS
from medseg.core.errors import MedsegError
from medseg.core.storage import Storage, join
from medseg.data.ingest import ingest
from medseg.data.manifest import DatasetRef
from medseg.data.preprocess import preprocess
from medseg.evaluation.evaluate import HD95_DEFINITION, HD95_EMPTY, evaluate, score_case
from medseg.inference.predict import predict
from medseg.io.nifti import decode
from medseg.io.report import curves_figure, display_channel
from medseg.registry.register import model_card_markdown, register
from medseg.tasks.labels import get_convention
from medseg.training.train import train
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def trained(
    synth_root: Path, minio_server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Storage, str, str]]:
    """A model trained for a few epochs on the six synthetic cases (two for validation)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("MEDSEG_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    storage = Storage(minio_server.settings(retry_seconds=10))
    bucket = "s3://t-evaluate"
    storage.ensure_bucket(bucket)
    cfg = tiny_config(train={"epochs": 4, "lr": 5e-3})
    ingest(str(synth_root / "brats2021"), "t", bucket, storage=storage, split=cfg.split)
    preprocess("t", bucket, cfg.data, storage=storage, progress=False)
    result = train("t", bucket, "run-e", cfg, storage=storage)
    yield storage, bucket, join(result.run_prefix, "model")
    patch.undo()


@pytest.fixture(scope="module")
def predicted(trained: tuple[Storage, str, str]) -> str:
    """The validation split predicted by the trained model (what evaluate scores)."""
    storage, bucket, model_uri = trained
    return predict(model_uri, dataset="t", store=bucket, storage=storage).out


def _dice(p: np.ndarray, t: np.ndarray) -> float:
    if not p.any() and not t.any():
        return 1.0
    return float(2 * (p & t).sum() / (p.sum() + t.sum()))


def test_numbers_are_those_of_the_served_label_maps(
    trained: tuple[Storage, str, str], predicted: str
) -> None:
    """Each case's Dice is recomputed from the label map predict wrote and the raw truth file."""
    storage, bucket, model_uri = trained
    result = evaluate(model_uri, predicted, storage=storage, threshold=0.0)
    ref = DatasetRef.resolve(storage, bucket, "t")
    manifest = ref.load(storage)
    val = manifest.split_ids("validation")
    assert sorted(c.case_id for c in result.cases) == sorted(val) and len(val) == 2
    assert result.predictions == join(
        bucket, "runs", "run-e", "predictions", f"t-{ref.version}-validation"
    )
    index = storage.get_json(join(result.predictions, "predictions.json"))
    keys = {c["case_id"]: c["key"] for c in index["cases"]}
    conv = get_convention(manifest.convention)
    by_id = {c.case_id: c for c in result.cases}
    for case_id in val:
        entry = manifest.case(case_id)
        truth = decode(storage.get_bytes(join(ref.prefix, entry.file("label").key)), "t", None)
        pred = decode(storage.get_bytes(join(result.predictions, keys[case_id])), "p", None)
        assert pred.data.shape == truth.data.shape  # the original grid
        assert np.allclose(pred.affine, truth.affine)
        t = conv.to_regions(np.rint(truth.data).astype(np.int64)).astype(bool)
        p = conv.to_regions(pred.data).astype(bool)
        for r, region in enumerate(REGIONS):
            assert by_id[case_id].dice[region] == pytest.approx(_dice(p[r], t[r]), abs=1e-5)
            assert by_id[case_id].voxels_pred[region] == int(p[r].sum())
    for region in REGIONS:
        assert result.dice[region] == pytest.approx(np.mean([c.dice[region] for c in result.cases]))
    # worst first
    assert [c.dice_mean for c in result.cases] == sorted(c.dice_mean for c in result.cases)
    stored = storage.get_json(join(result.out, "metrics.json"))
    assert stored["dice"] == pytest.approx(result.dice)
    assert stored["gate"] == {"metric": "dice_mean", "threshold": 0.0, "passed": True}
    assert "373.12866" in stored["conventions"]
    assert stored["definition"] == result.definition and "WT={1,2,4}" in result.definition
    assert result.out == model_uri[: -len("model")] + "eval"
    assert len(storage.get_bytes(join(result.out, "cases.csv")).decode().splitlines()) == 3
    # the model card names the definition its numbers follow
    card = register(
        storage, bucket, "run-e", "t-model", evaluation=join(result.out, "metrics.json")
    )
    assert card["evaluation"]["definition"] == result.definition
    # and the HD95 definition, by name (issue 22.2)
    assert stored["hd95_definition"] == HD95_DEFINITION == "brats-pooled-95"
    assert HD95_DEFINITION in stored["conventions"]
    assert card["evaluation"]["hd95_definition"] == HD95_DEFINITION
    markdown = model_card_markdown("t-model", "uri", card)
    assert f"HD95 definition: `{HD95_DEFINITION}`" in markdown
    assert card["evaluation"]["dice_mean"] == pytest.approx(result.dice_mean)


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.rows: list[list[str]] = []
        self._row: list[str] | None = None
        self._cell = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")
        elif tag == "tr":
            self._row = []
        elif tag == "td":
            self._cell = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr" and self._row:
            self.rows.append(self._row)
            self._row = None
        elif tag == "td":
            self._cell = False

    def handle_data(self, data: str) -> None:
        if self._cell and self._row is not None:
            self._row.append(data)


def test_report_is_self_contained_html(trained: tuple[Storage, str, str], predicted: str) -> None:
    storage, _, model_uri = trained
    result = evaluate(model_uri, predicted, storage=storage, threshold=0.99, max_overlays=1)
    assert not result.passed
    page_text = storage.get_bytes(join(result.out, "report.html")).decode()
    page = _Page()
    page.feed(page_text)
    # one row per case, worst first, then the mean; the numbers are the result's
    assert [r[0] for r in page.rows] == [c.case_id for c in result.cases] + ["mean"]
    assert float(page.rows[-1][1]) == pytest.approx(result.dice_mean, abs=1e-4)
    assert float(page.rows[0][2]) == pytest.approx(result.cases[0].dice["TC"], abs=1e-4)
    # curves + one overlay, embedded as PNG; nothing refers to another file
    assert len(page.images) == 2
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"(src|href)=['\"](?!data:)", page_text)
    assert "FAILED" in page_text and "373.12866" in page_text
    png = storage.get_bytes(result.overlays[0])
    assert png[:4] == b"\x89PNG"


def test_empty_region_conventions() -> None:
    empty = torch.zeros(3, 16, 16, 16, dtype=torch.uint8)
    cube = empty.clone()
    cube[:, 4:10, 4:10, 4:10] = 1
    both_empty = score_case("a", empty, empty, (1.0, 1.0, 1.0))
    assert both_empty.dice == dict.fromkeys(REGIONS, 1.0)
    assert both_empty.hd95 == dict.fromkeys(REGIONS, 0.0)
    missed = score_case("b", empty, cube, (1.0, 1.0, 1.0))
    assert missed.dice == dict.fromkeys(REGIONS, 0.0)
    assert missed.hd95 == dict.fromkeys(REGIONS, HD95_EMPTY)
    invented = score_case("c", cube, empty, (1.0, 1.0, 1.0))
    assert invented.dice == dict.fromkeys(REGIONS, 0.0)
    assert invented.hd95 == dict.fromkeys(REGIONS, HD95_EMPTY)


def test_hd95_is_in_millimetres() -> None:
    """A 6-voxel cube shifted by 2 voxels along x: the far faces are 2 voxels from the other
    cube's surface, and more than 5% of surface points lie on them, so HD95 is 2 voxels."""
    a = torch.zeros(3, 20, 20, 20, dtype=torch.uint8)
    b = a.clone()
    a[:, 4:10, 4:10, 4:10] = 1
    b[:, 6:12, 4:10, 4:10] = 1
    unit = score_case("u", a, b, (1.0, 1.0, 1.0))
    assert unit.hd95["WT"] == pytest.approx(2.0)
    assert unit.dice["WT"] == pytest.approx(2 * 4 / 12)
    assert score_case("s", a, b, (2.5, 1.0, 1.0)).hd95["WT"] == pytest.approx(5.0)


def test_cli_gate_and_errors(trained: tuple[Storage, str, str], minio_server, monkeypatch) -> None:
    storage, bucket, _ = trained
    for key, value in minio_server.env().items():
        monkeypatch.setenv(key, value)
    runner = CliRunner()
    pred = f"{bucket}/cli-pred"
    predicted = runner.invoke(
        app, ["predict", "--dataset", "t", "--model", "run-e", "--store", bucket, "--out", pred]
    )
    assert predicted.exit_code == 0, predicted.output
    assert len(storage.get_json(f"{pred}/volumes.json")) == 2
    args = ["evaluate", "--model", "run-e", "--store", bucket, "--out", f"{bucket}/cli-eval"]
    args += ["--predictions", pred]
    ok = runner.invoke(app, [*args, "--threshold", "0", "--enforce"])
    assert ok.exit_code == 0, ok.output
    assert "quality gate" in ok.output and "passed" in ok.output
    failed = runner.invoke(app, [*args, "--threshold", "1.01", "--enforce"])
    assert failed.exit_code == 3 and "FAILED" in failed.output
    stored = json.loads(storage.get_bytes(f"{bucket}/cli-eval/metrics.json"))
    assert stored["gate"]["passed"] is False
    reported = runner.invoke(app, [*args, "--threshold", "1.01"])
    assert reported.exit_code == 0  # without --enforce, the gate is reported only
    other = runner.invoke(app, [*args, "--split", "train"])
    assert other.exit_code == 1 and ":validation, not of t@" in other.output
    missing = runner.invoke(app, ["evaluate", "--model", "no-such-run", "--store", bucket])
    assert missing.exit_code == 1 and "is not a model artifact" in missing.output
    with pytest.raises(MedsegError, match="no cases in split 'nope'"):
        evaluate(join(bucket, "runs", "run-e", "model"), pred, storage=storage, split="nope")
    # Without --predictions the command predicts the split first (evaluate only scores).
    fresh = runner.invoke(app, ["evaluate", "--model", "run-e", "--store", bucket])
    assert fresh.exit_code == 0, fresh.output
    scored = storage.get_json(join(bucket, "runs", "run-e", "eval", "metrics.json"))
    assert scored["predictions"].startswith(join(bucket, "runs", "run-e", "predictions", "t-"))


def _drawn_texts(fig: Any) -> list[tuple[str, Any]]:
    """Every tick label and axis label the renderer draws, with its bounding box in pixels."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if not axis.get_visible():
                continue
            lo, hi = sorted(axis.get_view_interval())
            for tick in axis.get_major_ticks():
                if lo <= tick.get_loc() <= hi:
                    for label in (tick.label1, tick.label2):
                        if label.get_visible() and label.get_text():
                            texts.append((label.get_text(), label.get_window_extent(renderer)))
            if axis.label.get_text():
                texts.append((axis.label.get_text(), axis.label.get_window_extent(renderer)))
    return texts


def test_training_curves_do_not_overlap() -> None:
    """At the default size no tick label or axis label runs into another (issue 11.9): the
    learning-rate axis of the left panel used to run into the validation-Dice panel."""
    history = [
        {
            "epoch": e,
            "loss": 1 / (e + 1),
            "lr": 3e-3 * (1 - e / 40),
            "dice_tc": 0.5 + e / 100,
            "dice_wt": 0.6,
            "dice_et": 0.4,
            "dice_mean": 0.5,
        }
        for e in range(1, 41)
    ]
    fig = curves_figure(history)
    texts = _drawn_texts(fig)
    labels = {t for t, _ in texts}
    assert {"learning rate", "validation Dice", "training loss", "epoch"} <= labels
    overlapping = [
        (a, b) for (a, box_a), (b, box_b) in itertools.combinations(texts, 2)
        if box_a.overlaps(box_b)
    ]  # fmt: skip
    assert overlapping == []
    # and everything lies inside the figure
    width, height = fig.canvas.get_width_height()
    for text, box in texts:
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, text


def test_overlays_use_the_models_channel_order() -> None:
    """The overlay is drawn on FLAIR wherever the model's data.channels puts it (issue 11.1)."""
    image = np.stack([np.full((4, 4, 4), float(i)) for i in range(4)])
    assert display_channel(image, ("t1", "t1gd", "t2", "flair"))[0, 0, 0] == 3.0
    assert display_channel(image, ("flair", "t1", "t1gd", "t2"))[0, 0, 0] == 0.0
    with pytest.raises(ValueError, match="flair"):
        display_channel(image[:3], ("t1", "t1gd", "t2"))


def test_hd95_pools_both_directed_distance_sets() -> None:
    """HD95 is the BraTS scorer's: the 95th percentile of both directed sets pooled (issue 22.2).

    In a one-row image every mask voxel is a surface voxel (the row has no inside), so the
    distances can be listed by hand. Truth: columns 0-3; prediction: columns 0-3 and 9.
    Prediction to truth: 0, 0, 0, 0, 6; truth to prediction: 0, 0, 0, 0. Pooled, sorted, the
    95th percentile lies 0.95 * 8 = 7.6 of the way along: 0 + 0.6 * 6 = 3.6 voxels. (MONAI's
    larger of the two directed 95th percentiles: 0.8 * 6 = 4.8.)
    """
    from medseg.evaluation.evaluate import hd95

    truth = np.zeros((1, 12), dtype=bool)
    truth[0, 0:4] = True
    pred = truth.copy()
    pred[0, 9] = True
    assert hd95(pred, truth, (1.0, 1.0)) == pytest.approx(3.6)
    assert hd95(truth, pred, (1.0, 1.0)) == pytest.approx(3.6)  # symmetric
    assert hd95(pred, truth, (4.0, 0.5)) == pytest.approx(1.8)  # columns 0.5 mm apart


def test_hd95_anisotropic_3d_by_hand() -> None:
    """Distances in mm on an anisotropic 3D grid, nearest voxel chosen in mm (issue 22.2).

    Grid 1 x 2 x 8 at 3.0 x 2.0 x 0.5 mm: every mask voxel is a surface voxel. Truth (0,0,0),
    (0,0,1); prediction (0,1,0), (0,0,7). Prediction to truth: 2.0 (one step along y) and
    3.0 (six steps along z); truth to prediction: 2.0, and hypot(2.0, 0.5) from (0,0,1) to
    (0,1,0), nearer than the 3.0 mm to (0,0,7). Pooled and sorted: 2, 2, h, 3; the 95th
    percentile lies 0.95 * 3 = 2.85 along: h + 0.85 * (3 - h).
    """
    from medseg.evaluation.evaluate import hd95

    truth = np.zeros((1, 2, 8), dtype=bool)
    pred = truth.copy()
    truth[0, 0, 0] = truth[0, 0, 1] = True
    pred[0, 1, 0] = pred[0, 0, 7] = True
    h = math.hypot(2.0, 0.5)
    assert hd95(pred, truth, (3.0, 2.0, 0.5)) == pytest.approx(h + 0.85 * (3.0 - h))
    # a solid cube's surface is its outer shell: a 3x3x3 cube against its own centre voxel
    cube = np.zeros((5, 5, 5), dtype=bool)
    cube[1:4, 1:4, 1:4] = True
    centre = np.zeros_like(cube)
    centre[2, 2, 2] = True
    # shell (26 voxels): 6 face centres at 1, 12 edge centres at sqrt 2, 8 corners at sqrt 3;
    # the centre to the shell: 1. Pooled (27 values), the 95th percentile lies 0.95 * 26 =
    # 24.7 along, among the 8 corners: sqrt 3.
    assert hd95(cube, centre, (1.0, 1.0, 1.0)) == pytest.approx(math.sqrt(3))


def test_hd95_of_an_empty_mask_is_the_conventions() -> None:
    """hd95 measures two surfaces; an empty mask is score_case's convention, not a distance."""
    from medseg.evaluation.evaluate import hd95

    empty = np.zeros((4, 4, 4), dtype=bool)
    voxel = empty.copy()
    voxel[1, 1, 1] = True
    for pred, truth in ((empty, voxel), (voxel, empty), (empty, empty)):
        with pytest.raises(ValueError, match="empty"):
            hd95(pred, truth, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        hd95(voxel, voxel, (1.0, 1.0))
    # anisotropic spacing does not change the conventions
    t = torch.zeros(3, 4, 4, 4, dtype=torch.uint8)
    v = t.clone()
    v[:, 1, 1, 1] = 1
    assert score_case("e", t, t, (1.0, 2.0, 3.0)).hd95 == dict.fromkeys(REGIONS, 0.0)
    assert score_case("m", t, v, (1.0, 2.0, 3.0)).hd95 == dict.fromkeys(REGIONS, HD95_EMPTY)
    assert score_case("i", v, t, (1.0, 2.0, 3.0)).hd95 == dict.fromkeys(REGIONS, HD95_EMPTY)
