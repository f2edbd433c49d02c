"""The skin-lesion classification task through the shared machinery, on tiny synthetic data.

42 synthetic HAM10000 images, resized to 32 px once by preprocessing, 2 epochs of DenseNet121 on
the CPU: the test checks wiring and exact agreement with a recomputation, never a learned
quality (a few epochs on 42 images learn nothing reliable).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medseg.cli import app
from medseg.config import MedsegConfig, SplitConfig
from medseg.core.settings import ServerLimits
from medseg.core.storage import Storage, join
from medseg.data.dataset import PreprocessedDataset
from medseg.data.ingest import ingest
from medseg.data.manifest import DatasetRef
from medseg.data.preprocess import preprocess
from medseg.evaluation.evaluate import evaluate
from medseg.inference.classify import ClassEval, classify_images
from medseg.inference.infer import load_model
from medseg.inference.predict import predict
from medseg.io.images import decode_image
from medseg.platform.shards import collect_predictions, predict_shard
from medseg.registry.register import model_card_markdown, register
from medseg.tasks import get_task, task_of
from medseg.tasks.skin import SKIN, SkinTaskConfig, inverse_frequency
from medseg.tasks.skin_classes import CHANNELS, CLASSES
from medseg.tasks.skin_metrics import classification_metrics
from medseg.training.checkpoint import CheckpointStore
from medseg.training.train import DistributedWeightedSampler, EpochKeys, train
from tests.conftest import SKIN_SIZE, SkinModel, model_server, skin_config
from tests.unit.io.test_skin_images import jpeg_claiming, png_bomb


def test_the_config_names_the_skin_task() -> None:
    cfg = skin_config()
    assert task_of(cfg) is SKIN is get_task("skin-lesion-classification")
    assert isinstance(cfg.task, SkinTaskConfig) and cfg.task.imbalance == "weighted_sampler"
    assert SkinTaskConfig().imbalance == "weighted_sampler"  # the measured better default
    assert MedsegConfig.from_yaml(cfg.to_yaml(), "model.yaml") == cfg
    with pytest.raises(ValueError, match="out_channels is 3, task skin-lesion-classification"):
        MedsegConfig.model_validate(
            {**cfg.model_dump(), "model": {"name": "DenseNet121", "out_channels": 3}}
        )
    # a config that names only the task takes the task's network and channels
    bare = MedsegConfig.from_yaml("task: {kind: skin-lesion-classification}", "model.yaml")
    assert (bare.model.name, bare.model.out_channels, bare.data.channels) == (
        "DenseNet121",
        len(CLASSES),
        CHANNELS,
    )
    net = SKIN.build_network(cfg.model)
    assert net(torch.zeros(2, 3, SKIN_SIZE, SKIN_SIZE)).shape == (2, len(CLASSES))
    assert SKIN.metric_names()[-1] == SKIN.gate_metric == "macro_auc"


def test_imbalance_settings() -> None:
    assert inverse_frequency([6, 2, 0, 4]) == [0.5, 1.5, 0.0, 0.75]
    weighted = SKIN.loss(SkinTaskConfig(imbalance="class_weighted"), [6, 2, 0, 4, 1, 1, 1])
    plain = SKIN.loss(SkinTaskConfig(imbalance="none"), [6, 2, 0, 4, 1, 1, 1])
    logits, target = torch.randn(5, 7), torch.tensor([0, 1, 3, 0, 6])
    w = torch.tensor(inverse_frequency([6, 2, 0, 4, 1, 1, 1]))
    want = torch.nn.functional.cross_entropy(logits, target, weight=w.float())
    assert float(weighted(logits, target[:, None])) == pytest.approx(float(want), rel=1e-6)
    assert float(plain(logits, target)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, target)), rel=1e-6
    )
    labels = [0, 0, 0, 1, 2]
    assert SKIN.sampling_weights(SkinTaskConfig(imbalance="class_weighted"), labels) is None
    weights = SKIN.sampling_weights(SkinTaskConfig(imbalance="weighted_sampler"), labels)
    assert weights == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0, 1.0])


def test_weighted_sampler_splits_one_draw_across_ranks() -> None:
    weights = [1.0] * 90 + [9.0] * 10  # the ten rare cases hold half the mass
    ranks = [DistributedWeightedSampler(weights, 3, r, seed=4) for r in range(3)]
    for s in ranks:
        s.set_epoch(2)
    draws = [list(s) for s in ranks]
    assert [len(d) for d in draws] == [34, 34, 34] == [len(s) for s in ranks]
    alone = DistributedWeightedSampler(weights, 1, 0, seed=4)
    alone.set_epoch(2)
    g = torch.Generator().manual_seed(6)
    whole = torch.multinomial(torch.tensor(weights, dtype=torch.float64), 102, True, generator=g)
    assert sorted(i for d in draws for i in d) == sorted(
        whole.tolist()
    )  # one draw, dealt to the ranks
    assert list(alone) != draws[0]
    rare = sum(i >= 90 for d in draws for i in d)
    assert rare > 30  # half the mass: about 51 of 102 (a uniform draw gives about 10)
    with pytest.raises(ValueError, match="positive sum"):
        DistributedWeightedSampler([0.0, 0.0], 1, 0, seed=0)
    # Keyed for the dataset: rank r's k-th draw is the epoch's draw r + k * world.
    keyed = [EpochKeys(s, r, 3) for r, s in enumerate(ranks)]
    for k in keyed:
        k.set_epoch(2)
    dealt = sorted((draw, i) for k in keyed for epoch, draw, i in k if epoch == 2)
    assert dealt == list(enumerate(whole.tolist()))


@pytest.mark.slow  # ~45 s each on 2 cores; the sampler and the weights have fast tests above
@pytest.mark.parametrize("imbalance", ["class_weighted", "weighted_sampler"])
def test_skin_task_trains_on_the_shared_trainer(
    imbalance: str, ham: Path, storage: Storage, bucket: str
) -> None:
    cfg = skin_config(imbalance)
    ref: DatasetRef = ingest(
        str(ham), "skin", bucket, storage=storage, split=SplitConfig(val_fraction=0.3, seed=1)
    ).ref
    done = preprocess(str(ref), bucket, cfg.data, storage=storage, progress=False)
    manifest = ref.load(storage)
    labels = {c.case_id: c.label for c in manifest.cases}
    assert {e["case_id"]: e["label"] for e in done.index["cases"]} == labels
    data = PreprocessedDataset(done.prefix, None, settings=storage.settings)
    item = data[0]
    assert item["image"].shape == (3, SKIN_SIZE, SKIN_SIZE) and item["image"].dtype == torch.float16
    assert float(item["image"].min()) >= 0.0 and float(item["image"].max()) <= 1.0
    assert CLASSES[int(item["label"][0])] == labels[item["case_id"]]

    run = train(str(ref), bucket, f"skin-{imbalance.replace('_', '-')}", cfg, storage=storage)
    assert [h["epoch"] for h in run.history] == [1, 2]
    names = set(SKIN.metric_names())
    assert names <= set(run.history[-1]) and run.gate_metric == "macro_auc"
    # The record is the metrics of the final weights' validation probabilities, recomputed.
    val = PreprocessedDataset(done.prefix, "validation", settings=storage.settings)
    net = SKIN.build_network(cfg.model)
    loaded = CheckpointStore(storage, run.run_prefix).load_latest(map_location="cpu")
    assert loaded is not None and loaded[0] == 2
    net.load_state_dict(loaded[1]["model"])
    net.eval()
    with torch.no_grad():  # in the trainer's batches: the same arithmetic, bit for bit
        images = torch.stack([val[i]["image"].float() for i in range(len(val))])
        logits = torch.cat([net(images[s : s + 8]) for s in range(0, len(val), 8)])
    probs = np.array([SKIN.activate(row).tolist() for row in logits])
    truth = np.array([int(val[i]["label"][0]) for i in range(len(val))])
    m = classification_metrics(probs, truth, CLASSES)
    last = run.history[-1]
    assert last["macro_auc"] == pytest.approx(m.macro_auc, abs=1e-9, nan_ok=True)
    assert last["balanced_accuracy"] == pytest.approx(m.balanced_accuracy, abs=1e-9)
    assert Counter(truth.tolist()) == Counter(
        CLASSES.index(c.label) for c in manifest.cases if c.split == "validation"
    )


def test_skin_model_predicts_and_is_evaluated_on_what_it_wrote(
    skin_model: SkinModel, ham: Path, tmp_path: Path, s3_env: None
) -> None:
    storage, ref, model_uri = skin_model.storage, skin_model.ref, skin_model.uri
    predicted = predict(
        model_uri, dataset=str(ref), split="validation", store=skin_model.bucket, storage=storage
    )
    manifest = ref.load(storage)
    val = [c for c in manifest.cases if c.split == "validation"]
    assert sorted(c["case_id"] for c in predicted.cases) == sorted(c.case_id for c in val)
    assert not predicted.failed
    table = storage.get_bytes(join(predicted.out, "predictions.csv")).decode().splitlines()
    assert table[0] == "case,label,probability," + ",".join(f"p_{c}" for c in CLASSES)
    assert len(table) == len(val) + 1

    # the pipeline's sharded predict (medseg.platform.shards) writes the same answers, in order
    sharded = join(skin_model.bucket, "sharded")
    for shard in range(2):
        predict_shard(
            model_uri, str(ref), "validation", skin_model.bucket, shard, 2, sharded, storage
        )
    collect_predictions(model_uri, str(ref), "validation", skin_model.bucket, 2, sharded, storage)
    ours, theirs = (
        storage.get_json(join(uri, "predictions.json")) for uri in (sharded, predicted.out)
    )
    assert [r["case_id"] for r in ours["cases"]] == [r["case_id"] for r in theirs["cases"]]
    assert {k: ours[k] for k in ("dataset", "split", "classes", "failures")} == {
        k: theirs[k] for k in ("dataset", "split", "classes", "failures")
    }
    np.testing.assert_allclose(
        [list(r["probabilities"].values()) for r in ours["cases"]],
        [list(r["probabilities"].values()) for r in theirs["cases"]],
        atol=1e-5,
    )
    # evaluate() scores by the model's task: a classifier's probabilities, here
    result = evaluate(
        model_uri, split="validation", threshold=0.0, storage=storage, predictions=predicted.out
    )
    assert isinstance(result, ClassEval)
    # Exact agreement with a recomputation from the written CSV (6 decimals) and the manifest.
    rows = [line.split(",") for line in table[1:]]
    probs = np.array([[float(v) for v in r[3:]] for r in rows])
    truth = {c.case_id: CLASSES.index(str(c.label)) for c in val}
    labels = np.array([truth[r[0]] for r in rows])
    m = classification_metrics(probs, labels, CLASSES)
    assert result.gate_metric == "macro_auc" and result.passed
    assert result.value == pytest.approx(m.macro_auc, abs=1e-5, nan_ok=True)
    assert result.metrics.confusion == m.confusion
    assert result.metrics.balanced_accuracy == pytest.approx(m.balanced_accuracy, abs=1e-9)
    # `medseg evaluate` of a classifier prints its table and its gate, by the task's metric
    args = ["evaluate", "--model", model_uri, "--predictions", predicted.out, "--threshold", "0"]
    cli = CliRunner().invoke(app, [*args, "--out", join(skin_model.bucket, "cli-eval")])
    assert cli.exit_code == 0, cli.output
    assert f"macro AUC {m.macro_auc:.4f}" in cli.output
    assert "quality gate (macro_auc ≥ 0.0): passed" in cli.output
    doc = storage.get_json(join(result.out, "metrics.json"))
    assert doc["gate"] == {"metric": "macro_auc", "threshold": 0.0, "passed": True}
    assert doc["confusion"] == m.confusion
    assert result.summary()["macro_auc"] == result.value
    assert result.table()["class"] == list(CLASSES)
    # the model card takes the task's scores and gate
    card = register(
        storage, skin_model.bucket, "skin-eval", "skin", evaluation=join(result.out, "metrics.json")
    )
    assert card["evaluation"]["gate"]["metric"] == "macro_auc"
    assert card["evaluation"]["macro_auc"] == pytest.approx(result.value, nan_ok=True)
    assert "cases" not in card["evaluation"]
    markdown = model_card_markdown("skin", "uri", card)
    assert "- validation macro_auc: " in markdown and "- validation ROC AUC nv: " in markdown
    page = storage.get_bytes(join(result.out, "report.html")).decode()
    assert "Confusion matrix" in page and "reliability diagram" in page
    wrong = sum(1 for r in rows if r[1] != CLASSES[truth[r[0]]])
    assert page.count('alt="mistake ') == min(wrong, 6)

    # Batch prediction of a folder of JPEGs (the synthetic HAM10000 files themselves).
    folder = str(ham / "HAM10000_images_part_1")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    files = predict(model_uri, str(tmp_path / "out"), paths=[folder], storage=storage)
    assert len(files.cases) == len(list((ham / "HAM10000_images_part_1").glob("*.jpg")))
    bad = predict(model_uri, str(tmp_path / "out2"), paths=[str(tmp_path)], storage=storage)
    assert [f.case_id for f in bad.failed] == ["junk"] and "not a JPEG or PNG" in bad.failed[
        0
    ].reason


_TRITON = """
import json, sys
import numpy as np
import tritonclient.grpc as tgrpc, tritonclient.http as thttp
rest, grpc, tensor, files = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
blobs = np.array([open(f, "rb").read() for f in files], dtype=np.object_)
pixels = np.load(tensor)
report = []
for module, url in ((thttp, rest), (tgrpc, grpc)):
    client = module.InferenceServerClient(url)
    assert client.is_model_ready("medseg")
    answer = {}
    for name, data, dtype in (("files", blobs, "BYTES"), ("tensor", pixels, "UINT8")):
        inp = module.InferInput("image", list(data.shape), dtype)
        inp.set_data_from_numpy(data)
        outs = [module.InferRequestedOutput(n) for n in ("probabilities", "label", "top_k")]
        r = client.infer("medseg", [inp], outputs=outs, parameters={"top_k": 2})
        answer[name] = {
            "probabilities": r.as_numpy("probabilities").tolist(),
            "label": [v.decode() for v in r.as_numpy("label").ravel()],
            "top_k": [[v.decode() for v in row] for row in r.as_numpy("top_k")],
        }
    report.append(answer)
print(json.dumps(report))
"""


def test_skin_model_is_served_by_the_predictor(
    skin_model: SkinModel, ham: Path, tmp_path: Path
) -> None:
    storage = skin_model.storage
    model_dir = tmp_path / "model"
    for name in ("model.pt", "model.yaml", "lineage.json"):
        storage.get_file(join(skin_model.uri, name), model_dir / name)
    files = sorted((ham / "HAM10000_images_part_1").glob("*.jpg"))[:3]
    limits = ServerLimits()
    pixels = [decode_image(f.read_bytes(), f.name, limits) for f in files]
    ours = classify_images(load_model(str(model_dir), device="cpu"), pixels)
    np.save(tmp_path / "x.npy", np.stack(pixels[:1]))  # image 0 as a UINT8 tensor
    with model_server(model_dir, tmp_path / "server.log") as server:
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                _TRITON,
                server.url[7:],
                server.grpc,
                str(tmp_path / "x.npy"),
                *map(str, files),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        for answer in json.loads(done.stdout.strip().splitlines()[-1]):  # HTTP, then gRPC
            got = np.array(answer["files"]["probabilities"])
            np.testing.assert_allclose(got, ours, atol=1e-5)
            assert answer["files"]["label"] == [CLASSES[int(np.argmax(p))] for p in ours]
            order = np.argsort(-ours, axis=1, kind="stable")
            assert answer["files"]["top_k"] == [[CLASSES[c] for c in r[:2]] for r in order]
            np.testing.assert_allclose(answer["tensor"]["probabilities"], ours[:1], atol=1e-5)
        # REST v1: the seed endpoint's class and probability
        body = {
            "instances": [{"image_b64": base64.b64encode(f.read_bytes()).decode()} for f in files]
        }
        r = httpx.post(f"{server.url}/v1/models/medseg:predict", json=body, timeout=120)
        assert r.status_code == 200, r.text
        predictions = r.json()["predictions"]
        for p, want in zip(predictions, ours, strict=True):
            assert p["class"] == CLASSES[int(np.argmax(want))]
            assert p["probability"] == pytest.approx(float(want.max()), abs=1e-5)
            assert p["class_name"] == SKIN.class_names[p["class"]]
        # Bounded decoding: a bomb or an oversized header is a 400 naming the image.
        for bad, reason in (
            (jpeg_claiming(60000, 60000), "JPEG header announces more pixels"),
            (png_bomb(7000, 7000), "max_image_pixels"),
            (b"not an image", "not a JPEG or PNG"),
        ):
            body = {"instances": [{"image_b64": base64.b64encode(bad).decode()}]}
            r = httpx.post(f"{server.url}/v1/models/medseg:predict", json=body, timeout=60)
            assert r.status_code == 400 and reason in r.text, r.text
        r = httpx.post(f"{server.url}/v1/models/medseg:predict", json={"instances": []}, timeout=60)
        assert r.status_code == 400 and "non-empty 'instances'" in r.text
