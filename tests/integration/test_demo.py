"""The demo: its post-pipeline steps in every layout ingest accepts, and one real run end to end."""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.apps.demo import held_out_case, score_mask
from medseg.config import CHANNELS
from medseg.core.errors import MedsegError
from medseg.core.storage import Storage
from medseg.data.ingest import ingest
from medseg.data.layouts import SUFFIXES
from medseg.tasks.labels import get_convention
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[2]


def _nifti_bytes(data: np.ndarray, like: Path) -> bytes:
    img = nib.load(str(like))
    out = nib.Nifti1Image(data.astype(np.uint8), img.affine)  # type: ignore[attr-defined]
    return gzip.compress(out.to_bytes())


@pytest.mark.parametrize("layout", ["brats2021", "brats2023", "msd"])
def test_held_out_case_is_found_and_scored_in_its_own_convention(
    layout: str, synth_root: Path, storage: Storage, bucket: str
) -> None:
    source = synth_root / layout
    manifest = ingest(str(source), f"demo-{layout}", bucket, storage=storage).manifest
    case = held_out_case(manifest, source)

    assert case.case_id == manifest.split_ids("validation")[0]
    assert case.convention == manifest.convention == layout
    if layout == "msd":  # cases are files: one 4D image, channels in dataset.json's order
        assert case.files == [source / "imagesTr" / f"{case.case_id}.nii.gz"]
        assert case.channels == ["flair", "t1", "t1gd", "t2"]
        assert case.label == source / "labelsTr" / f"{case.case_id}.nii.gz"
    else:  # one file per channel, sent in canonical order
        folder = source / case.case_id
        assert case.channels == list(CHANNELS)
        assert case.files == [
            folder / f"{case.case_id}{SUFFIXES[layout][c]}.nii.gz" for c in CHANNELS
        ]
        assert case.label == folder / f"{case.case_id}{SUFFIXES[layout]['label']}.nii.gz"

    # The ground truth itself scores 1 everywhere.
    perfect = score_mask(case.label.read_bytes(), case)
    assert perfect.dice == {"TC": 1.0, "WT": 1.0, "ET": 1.0}

    # Enhancing tumour relabelled as oedema: ET is lost, WT is not. Scored with another
    # convention (BraTS 2021's ET is label 4, absent from 2023 and MSD maps) ET would stay 1.
    conv = get_convention(layout)
    truth = np.rint(np.asarray(nib.load(str(case.label)).dataobj)).astype(np.int64)  # type: ignore[attr-defined]
    enhancing = np.isin(truth, conv.et)
    assert enhancing.any()
    wrong = truth.copy()
    wrong[enhancing] = conv.oedema_label
    scores = score_mask(_nifti_bytes(wrong, case.label), case)
    assert scores.dice["ET"] == 0.0
    assert scores.dice["WT"] == 1.0
    assert scores.dice["TC"] < 1.0


def test_held_out_case_missing_from_the_source_is_named(
    synth_root: Path, storage: Storage, bucket: str, tmp_path: Path
) -> None:
    import shutil

    source = tmp_path / "msd"
    shutil.copytree(synth_root / "msd", source)
    manifest = ingest(str(source), "gone", bucket, storage=storage).manifest
    case_id = manifest.split_ids("validation")[0]
    (source / "imagesTr" / f"{case_id}.nii.gz").unlink()
    with pytest.raises(MedsegError, match=f"validation case {case_id} not found in {source}"):
        held_out_case(manifest, source)


STEPS = ["ingest", "preprocess", "train", "evaluate", "gate", "register", "deploy"]


def _run_demo(workdir: Path, args: list[str]) -> tuple[subprocess.CompletedProcess[str], str]:
    """``medseg demo --workdir WORKDIR ARGS`` as a user runs it (no object store in the
    environment, one thread per process); it must succeed. The run and ``demo.log``'s text."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "S3_", "MEDSEG_ENV_FILE", "MEDSEG_CACHE_DIR"))
    }
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "medseg", "demo", "--workdir", str(workdir), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    log_path = workdir / "demo.log"
    log = log_path.read_text() if log_path.is_file() else ""
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:] + log[-3000:]
    return done, log


@pytest.mark.slow
def test_demo_on_msd_is_short_on_the_terminal_and_logs_everything(
    synth_root: Path, tmp_path: Path
) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(tiny_config(train={"epochs": 2, "batch_size": 1}).to_yaml())
    workdir = tmp_path / "demo"
    args = ["--source", str(synth_root / "msd"), "--config", str(config), "--threshold", "0"]
    done, log = _run_demo(workdir, args)
    log_path = workdir / "demo.log"

    # The terminal: one line per step with its time, the results table, where the log is.
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) <= 30, done.stdout
    for step in [*STEPS, "serve", "predict"]:
        assert re.search(rf"✓ {step} +\d+\.\d s", done.stdout), (step, done.stdout)
    assert "2 epochs, validation mean Dice" in done.stdout
    # the run, its evaluation and the registered version, read back from the demo's MLflow
    tracked = re.search(
        r"MLflow http://127\.0\.0\.1:\d+: run (\w+) \((\d+) epochs logged\)", done.stdout
    )
    assert tracked and tracked.group(2) == "2", done.stdout
    assert "model demo-segresnet version 1 (champion)" in done.stdout
    assert f"full log: {log_path}" in done.stdout
    case_id = re.search(r"Dice on (\S+)", done.stdout)
    assert case_id, done.stdout
    for noise in ("KFP Executor", "executor_input", "Warning", "Traceback"):
        assert noise not in done.stdout + done.stderr, noise
    assert done.stderr.strip() == ""

    # The log file: kfp.local's executor logs, every epoch, the model server.
    for step in STEPS:
        assert f"Executing task '{step}-op'" in log
    assert "KFP Executor" in log and "Got executor_input" in log
    assert len(re.findall(r"\[medseg\.train\] epoch \{", log)) == 2
    assert "Uvicorn running" in log and "/v2/models/demo-segresnet/infer" in log
    assert (
        "FutureWarning" not in log
    )  # MONAI's HD95 path is not called (medseg.evaluation.evaluate.hd95)
    assert "\x1b[" not in log  # no terminal colours in the file

    mask = nib.Nifti1Image.from_bytes(
        gzip.decompress((workdir / f"{case_id.group(1)}_mask.nii.gz").read_bytes())
    )
    assert set(np.unique(np.asarray(mask.dataobj))) <= get_convention("msd").allowed


@pytest.mark.slow
def test_skin_lesion_demo_runs_the_same_chain_for_a_classifier(tmp_path: Path) -> None:
    """``medseg demo --task skin-lesion``: synthetic HAM10000 → pipeline → served class."""
    config = tmp_path / "tiny-skin.yaml"
    config.write_text(
        "task: {kind: skin-lesion-classification}\n"
        "data: {image_size: [32, 32]}\n"
        "train: {epochs: 2, batch_size: 8, num_workers: 0, amp: false}\n"
        "split: {val_fraction: 0.3}\n"
    )
    workdir = tmp_path / "demo"
    args = ["--task", "skin-lesion", "--cases", "56", "--config", str(config), "--threshold", "0"]
    done, log = _run_demo(workdir, args)
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert len(lines) <= 40, done.stdout  # the table has a row per class
    assert "56 synthetic HAM10000-like dermoscopy images" in done.stdout
    for step in [*STEPS, "serve", "predict"]:
        assert re.search(rf"✓ {step} +\d+\.\d s", done.stdout), (step, done.stdout)
    assert re.search(r"2 epochs, validation macro AUC \d\.\d{3}", done.stdout), done.stdout
    assert "model demo-densenet version 1 (champion)" in done.stdout
    # the results: AUC per class and macro, balanced accuracy, the served answer in the seed's form
    for row in ("nv", "mel", "bkl", "bcc", "akiec", "vasc", "df", "macro"):
        assert re.search(rf"│ +{row} │", done.stdout), (row, done.stdout)
    assert re.search(r"balanced accuracy \d\.\d{4}", done.stdout), done.stdout
    served = re.search(r"served (\S+) \(truly (.+)\): class: (.+), probability: \d+%", done.stdout)
    assert served, done.stdout
    assert done.stderr.strip() == ""
    for noise in ("KFP Executor", "executor_input", "Traceback"):
        assert noise not in done.stdout, noise
    # the server answered the seed's REST v1 call and the OIP v2 gRPC call
    assert '"POST /v1/models/demo-densenet%3Apredict HTTP/1.1" 200' in log
    assert "GRPCInferenceService/ModelInfer" in log
    assert len(re.findall(r"\[medseg\.train\] epoch \{", log)) == 2
    page = (workdir / "report.html").read_text()
    assert "Confusion matrix" in page and "reliability diagram" in page
