"""The skin-lesion classification task through the shared machinery, on tiny synthetic data.

42 synthetic HAM10000 images, resized to 32 px once by preprocessing, 2 epochs of DenseNet121 on
the CPU: the test checks wiring and exact agreement with a recomputation, never a learned
quality (a few epochs on 42 images learn nothing reliable).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medseg.checkpoint import CheckpointStore
from medseg.config import MedsegConfig, SplitConfig
from medseg.dataset import PreprocessedDataset
from medseg.ingest import ingest
from medseg.manifest import DatasetRef
from medseg.preprocess import preprocess
from medseg.skin.classes import CHANNELS, CLASSES
from medseg.skin.metrics import classification_metrics
from medseg.skin.synth import write_ham10000
from medseg.storage import Storage
from medseg.tasks import get_task, task_of
from medseg.tasks.skin import SKIN, SkinTaskConfig, inverse_frequency
from medseg.train import DistributedWeightedSampler, train

N = 42
SIZE = 32


def skin_config(imbalance: str = "class_weighted", **train: Any) -> MedsegConfig:
    """A tiny skin-lesion config: 32 px images, 2 epochs, no workers."""
    return MedsegConfig.model_validate(
        {
            "task": {"kind": "skin-lesion-classification", "imbalance": imbalance},
            "data": {"channels": list(CHANNELS), "image_size": [SIZE, SIZE]},
            "model": {"name": "DenseNet121", "in_channels": 3, "out_channels": len(CLASSES)},
            "train": {
                "epochs": 2,
                "batch_size": 8,
                "lr": 1e-3,
                "num_workers": 0,
                "amp": False,
                **train,
            },
            "split": {"val_fraction": 0.3, "seed": 1},
        }
    )


@pytest.fixture(scope="module")
def ham(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ham")
    write_ham10000(root, N, seed=5)
    return root


def test_the_config_names_the_skin_task() -> None:
    cfg = skin_config()
    assert task_of(cfg) is SKIN is get_task("skin-lesion-classification")
    assert isinstance(cfg.task, SkinTaskConfig) and cfg.task.imbalance == "class_weighted"
    assert MedsegConfig.from_yaml(cfg.to_yaml(), "model.yaml") == cfg
    with pytest.raises(ValueError, match="out_channels is 3, task skin-lesion-classification"):
        MedsegConfig.model_validate(
            {**cfg.model_dump(), "model": {"name": "DenseNet121", "in_channels": 3}}
        )
    net = SKIN.build_network(cfg.model)
    assert net(torch.zeros(2, 3, SIZE, SIZE)).shape == (2, len(CLASSES))
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
    assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float16
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
