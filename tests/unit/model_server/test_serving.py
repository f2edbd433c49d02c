"""The model server on loopback: kserve's ModelServer with our predictor, REST and gRPC."""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medseg.config import REGIONS
from medseg.core.errors import MedsegError
from medseg.core.storage import Storage
from medseg.inference.infer import load_model, segment_case
from medseg.serving.client import predict, serialize_bytes
from tests.conftest import case_array as _case_array

HEADER = "inference-header-content-length"


@pytest.fixture(scope="module")
def case(served_case: Path) -> Path:
    """The served case (one for the session: tests/conftest.py)."""
    return served_case


@pytest.fixture(scope="module")
def model_dir(served_model_dir: Path) -> Path:
    """The served model (one for the session)."""
    return served_model_dir


@pytest.fixture(scope="module")
def server(served: dict[str, str]) -> dict[str, str]:
    """The one model server of the session (``python -m model_server`` on loopback)."""
    return served


def _mask(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def _assert_good(server: dict[str, str], case: Path) -> None:
    """The server still answers a good request."""
    assert predict(server["rest"], [case]).volumes_ml.keys() == set(REGIONS)


def test_rest_and_grpc_agree_with_in_process_inference(
    server: dict[str, str], case: Path, model_dir: Path
) -> None:
    image, affine = _case_array(case)
    expected = segment_case(load_model(str(model_dir), Storage()), image, affine)
    rest = predict(server["rest"], [case])
    grpc = predict(server["grpc"], [case], grpc=True)
    for answer in (rest, grpc):
        mask = _mask(answer.mask)
        assert mask.shape == image.shape[1:]
        np.testing.assert_allclose(mask.affine, affine, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(mask.dataobj), expected.label_map("brats2021"))
        for region in REGIONS:
            assert answer.volumes_ml[region] == pytest.approx(expected.volumes_ml[region], 1e-5)
        assert answer.compute_ms is not None and answer.compute_ms > 0
        # every answer names its model: an unregistered folder, by its weights' sha256
        assert answer.model_version == "unregistered"
        assert (
            answer.model_sha256 == hashlib.sha256((model_dir / "model.pt").read_bytes()).hexdigest()
        )
    # the volumes are the mask's voxels times the voxel volume
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    wt = np.isin(np.asarray(_mask(rest.mask).dataobj), (1, 2, 4)).sum()
    assert rest.volumes_ml["WT"] == pytest.approx(wt * voxel_ml, 1e-5)


def test_raw_tensors_and_label_conventions(server: dict[str, str], case: Path) -> None:
    as_nifti = predict(server["rest"], [case], label_convention="msd")
    for dtype in ("FP32", "FP16"):
        for grpc in (False, True):
            url = server["grpc"] if grpc else server["rest"]
            got = predict(url, [case], grpc=grpc, tensor=dtype, label_convention="msd")
            assert got.label_convention == "msd"
            labels = np.asarray(_mask(got.mask).dataobj)
            assert set(np.unique(labels)) <= {0, 1, 2, 3}
            if dtype == "FP32":  # the same voxels as the NIfTI request
                assert got.volumes_ml == pytest.approx(as_nifti.volumes_ml)
    probs = predict(server["rest"], [case], probabilities=True)
    assert probs.probabilities is not None
    assert probs.probabilities.size == 3 * int(np.prod(_mask(probs.mask).shape))


_TRITON_SCRIPT = """
import gzip, hashlib, json, sys
import nibabel as nib, numpy as np
import tritonclient.grpc as tgrpc, tritonclient.http as thttp
rest, grpc, case = sys.argv[1:4]
x = np.load(case)
params = {"affine": ",".join(map(str, np.load(case.replace(".npy", ".aff.npy")).ravel())),
          "label_convention": "brats2023"}
report = []
for module, url in ((thttp, rest), (tgrpc, grpc)):
    client = module.InferenceServerClient(url)
    assert client.is_server_ready() and client.is_model_ready("medseg")
    inp = module.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    names = ("mask", "volumes_ml", "labels")
    outs = [module.InferRequestedOutput(n) for n in names]
    result = client.infer("medseg", [inp], outputs=outs, parameters=params)
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(result.as_numpy("mask").ravel()[0]))
    labels = result.as_numpy("labels")
    meta = client.get_model_metadata("medseg")
    outputs = meta["outputs"] if isinstance(meta, dict) else meta.outputs
    report.append({
        "volumes": result.as_numpy("volumes_ml").tolist(),
        "mask": hashlib.sha256(np.asarray(mask.dataobj).tobytes()).hexdigest(),
        "plain": [str(labels.dtype), list(labels.shape),
                  hashlib.sha256(np.ascontiguousarray(labels).tobytes()).hexdigest()],
        "labels": sorted(int(v) for v in np.unique(np.asarray(mask.dataobj))),
        "outputs": [o["name"] if isinstance(o, dict) else o.name for o in outputs],
    })
print(json.dumps(report))
"""


def test_standard_oip_clients_work_unchanged(
    server: dict[str, str], case: Path, tmp_path: Path
) -> None:
    """tritonclient (HTTP with binary data, and gRPC) against our server, no adaptation.

    In a process of its own: tritonclient's and kserve's protobuf modules both define the
    ``inference`` package and cannot be imported into one interpreter.
    """
    image, affine = _case_array(case)
    np.save(tmp_path / "x.npy", image[None].astype(np.float32))
    np.save(tmp_path / "x.aff.npy", affine)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _TRITON_SCRIPT,
            server["rest"][7:],
            server["grpc"],
            str(tmp_path / "x.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    http, grpc = orjson.loads(done.stdout.strip().splitlines()[-1])
    assert http["volumes"] == pytest.approx(grpc["volumes"]) and len(http["volumes"]) == 3
    assert http["mask"] == grpc["mask"]
    assert set(http["labels"]) <= {0, 1, 2, 3}  # BraTS 2023 labels, as asked
    # the plain UINT8 tensor is the mask's label map, voxel for voxel, over HTTP and gRPC
    for answer in (http, grpc):
        assert answer["plain"] == ["uint8", list(image.shape[1:]), http["mask"]]
    outputs = ["mask", "volumes_ml", "labels", "probabilities"]
    assert http["outputs"] == grpc["outputs"] == outputs
    ours = predict(server["rest"], [case], label_convention="brats2023")
    assert http["volumes"] == pytest.approx([ours.volumes_ml[r] for r in REGIONS], rel=1e-5)


def test_labels_output_to_a_plain_http_client(server: dict[str, str], case: Path) -> None:
    """A plain HTTP client asks for ``labels`` only: raw UINT8 voxels, equal to the mask's."""
    blobs = [next(case.glob(f"*_{m}.nii.gz")).read_bytes() for m in ("t1", "t1ce", "t2", "flair")]
    spec = {"name": "nifti", "datatype": "BYTES", "shape": [4]}
    want = {"name": "labels", "parameters": {"binary_data": True}}
    body, headers = _binary_request(
        [(spec, serialize_bytes(blobs))], outputs=[want], parameters={"label_convention": "msd"}
    )
    r = httpx.post(
        f"{server['rest']}/v2/models/medseg/infer", content=body, headers=headers, timeout=120
    )
    assert r.status_code == 200, r.text
    n = int(r.headers[HEADER])
    (out,) = orjson.loads(r.content[:n])["outputs"]
    assert (out["name"], out["datatype"]) == ("labels", "UINT8")
    assert out["parameters"] == {"label_convention": "msd", "binary_data_size": len(r.content) - n}
    labels = np.frombuffer(r.content[n:], dtype=np.uint8).reshape(out["shape"])
    mask = predict(server["rest"], [case], label_convention="msd").mask
    np.testing.assert_array_equal(labels, np.asarray(_mask(mask).dataobj))
    assert labels.any()  # a real label map, not zeros
    from model_server.protocol import SHA256_HEADER, VERSION_HEADER

    assert r.headers[VERSION_HEADER] == "unregistered" and len(r.headers[SHA256_HEADER]) == 64
    meta = httpx.get(f"{server['rest']}/v2/models/medseg", timeout=30).json()
    assert {"name": "labels", "datatype": "UINT8", "shape": [-1, -1, -1]} in meta["outputs"]
    unknown = _binary_request([(spec, serialize_bytes(blobs))], outputs=[{"name": "nope"}])
    r = httpx.post(
        f"{server['rest']}/v2/models/medseg/infer",
        content=unknown[0],
        headers=unknown[1],
        timeout=60,
    )
    assert r.status_code == 400 and "unknown output(s) requested: nope" in r.text


def test_json_and_v1_requests(server: dict[str, str], case: Path) -> None:
    image, _ = _case_array(case)
    small = image[:, :24, :24, :16]
    body = {
        "inputs": [
            {
                "name": "image",
                "datatype": "FP32",
                "shape": [1, *small.shape],
                "data": small.ravel().tolist(),
                "parameters": {"spacing": "1,1,1.5"},
            }
        ]
    }
    r = httpx.post(f"{server['rest']}/v2/models/medseg/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    doc = r.json()
    out = {o["name"]: o for o in doc["outputs"]}
    assert out["mask"]["parameters"]["content_encoding"] == "base64"
    mask = _mask(base64.b64decode(out["mask"]["data"][0]))
    assert mask.shape == small.shape[1:]
    assert mask.header.get_zooms() == (1.0, 1.0, 1.5)
    assert len(out["volumes_ml"]["data"]) == 3

    flair = base64.b64encode(next(case.glob("*_flair.nii.gz")).read_bytes()).decode()
    nifti_json = {
        "inputs": [
            {
                "name": "nifti",
                "datatype": "BYTES",
                "shape": [4],
                "data": [flair] * 4,
                "parameters": {"content_encoding": "base64"},
            }
        ]
    }
    r = httpx.post(f"{server['rest']}/v2/models/medseg/infer", json=nifti_json, timeout=60)
    assert r.status_code == 200, r.text
    assert len(r.json()["outputs"][1]["data"]) == 3

    b64 = {
        m: base64.b64encode(next(case.glob(f"*_{f}.nii.gz")).read_bytes()).decode()
        for m, f in (("t1", "t1"), ("t1gd", "t1ce"), ("t2", "t2"), ("flair", "flair"))
    }
    r = httpx.post(
        f"{server['rest']}/v1/models/medseg:predict",
        json={"instances": [{"modalities": b64}]},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    assert set(pred["volumes_ml"]) == set(REGIONS)
    assert _mask(base64.b64decode(pred["mask_b64"])).shape == image.shape[1:]
    assert pred["model_version"] == "unregistered" and len(pred["model_sha256"]) == 64
    assert r.headers["X-Medseg-Model-Sha256"] == pred["model_sha256"]


def _binary_request(inputs: list[tuple[dict, bytes]], **extra: object) -> tuple[bytes, dict]:
    specs = []
    for spec, raw in inputs:
        specs.append(
            {**spec, "parameters": {**spec.get("parameters", {}), "binary_data_size": len(raw)}}
        )
    head = orjson.dumps({"inputs": specs, **extra})
    return head + b"".join(r for _, r in inputs), {HEADER: str(len(head))}


def _bad_requests(case: Path) -> dict[str, tuple[bytes, dict, int, str]]:
    image, _ = _case_array(case)
    nan = image.copy()
    nan[0, 1, 2, 3] = np.nan
    nifti = next(case.glob("*_flair.nii.gz")).read_bytes()

    def tensor(arr: np.ndarray, dtype: str = "FP32") -> tuple[bytes, dict]:
        return _binary_request(
            [({"name": "image", "datatype": dtype, "shape": [1, *arr.shape]}, arr.tobytes())]
        )

    def niftis(blobs: list[bytes]) -> tuple[bytes, dict]:
        spec = {"name": "nifti", "datatype": "BYTES", "shape": [len(blobs)]}
        return _binary_request([(spec, serialize_bytes(blobs))])

    wrong_size = _binary_request(
        [({"name": "image", "datatype": "FP32", "shape": [1, 4, 8, 8, 8]}, b"\0" * 100)]
    )
    return {
        "three channels": (*tensor(image[:3]), 400, "expected 4 channels"),
        "integer dtype": (*tensor(image.astype(np.int32), "INT32"), 400, "FP32 or FP16"),
        "size mismatch": (*wrong_size, 400, "do not hold FP32 of shape"),
        "NaN voxel": (*tensor(nan), 400, "NaN or Inf"),
        "corrupt NIfTI": (*niftis([nifti[:200]]), 400, "not a readable NIfTI"),
        "3D NIfTI alone": (*niftis([nifti]), 400, "must be a 4D image"),
        "two files": (*niftis([nifti, nifti]), 400, "holds 2 files"),
        "empty body": (b"", {}, 400, "empty request body"),
        "not JSON": (b"{nope", {}, 400, "malformed"),
        "unknown input": (
            orjson.dumps(
                {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}
            ),
            {},
            400,
            "unknown input 'x'",
        ),
        "bad convention": (
            *_binary_request(
                [
                    (
                        {"name": "image", "datatype": "FP32", "shape": [1, *image.shape]},
                        image.tobytes(),
                    )
                ],
                parameters={"label_convention": "brats1999"},
            ),
            400,
            "unknown label_convention",
        ),
        "too large": (b"{" + b" " * (5 * 1024 * 1024) + b"}", {}, 413, "exceeds the limit"),
    }


@pytest.mark.parametrize(
    "name",
    [
        "three channels",
        "integer dtype",
        "size mismatch",
        "NaN voxel",
        "corrupt NIfTI",
        "3D NIfTI alone",
        "two files",
        "empty body",
        "not JSON",
        "unknown input",
        "bad convention",
        "too large",
    ],
)
def test_bad_rest_input_is_a_4xx_and_the_server_keeps_serving(
    server: dict[str, str], case: Path, name: str
) -> None:
    body, headers, status, message = _bad_requests(case)[name]
    r = httpx.post(
        f"{server['rest']}/v2/models/medseg/infer", content=body, headers=headers, timeout=60
    )
    assert r.status_code == status, r.text
    assert message in r.text
    _assert_good(server, case)


def test_bad_grpc_input_is_invalid_argument(
    server: dict[str, str], case: Path, tmp_path: Path
) -> None:
    (tmp_path / "x.nii.gz").write_bytes(b"\x1f\x8bgarbage")
    with pytest.raises(MedsegError, match=r"INVALID_ARGUMENT.*not a readable NIfTI"):
        predict(server["grpc"], [tmp_path / "x.nii.gz"], grpc=True)
    with pytest.raises(MedsegError, match=r"INVALID_ARGUMENT.*unknown label_convention"):
        predict(server["grpc"], [case], grpc=True, label_convention="nope")
    assert predict(server["grpc"], [case], grpc=True).compute_ms is not None


def _pb() -> object:
    from medseg.serving.kserve_import import clean_argv

    with clean_argv([]):
        from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    return pb


def test_grpc_raw_contents_split_and_join_as_protobuf_does() -> None:
    """The gRPC framing of ``raw_input_contents``: protobuf's own parse is the reference."""
    from medseg.core.errors import InputError
    from medseg.serving.codec import join_grpc_raw, split_grpc_raw

    pb: Any = _pb()
    tensors = [np.arange(300, dtype=np.uint8).tobytes(), b"", b"\x07" * 200]
    request = pb.ModelInferRequest(
        model_name="medseg",
        id="r1",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name=f"i{n}",
                datatype="UINT8",
                shape=[len(t)],
                parameters={"affine": pb.InferParameter(string_param="1,0,0")},
            )
            for n, t in enumerate(tensors)
        ],
        parameters={"k": pb.InferParameter(int64_param=-3), "f": pb.InferParameter(bool_param=1)},
        raw_input_contents=tensors,
    )
    message = request.SerializeToString()
    head, raws = split_grpc_raw(message, 7, "request")
    assert [bytes(r) for r in raws] == tensors
    rest = pb.ModelInferRequest.FromString(head)
    assert not rest.raw_input_contents
    rest.raw_input_contents.extend(tensors)
    assert rest == request
    # views into the message, not copies
    assert np.shares_memory(np.frombuffer(raws[0], np.uint8), np.frombuffer(message, np.uint8))
    assert pb.ModelInferRequest.FromString(join_grpc_raw(head, 7, raws)) == request
    for bad in (message[:-5], message[:3], b"\x3f\x3f"):
        with pytest.raises(InputError, match="request"):
            split_grpc_raw(bad, 7, "request")


def test_malformed_grpc_messages_are_invalid_argument(server: dict[str, str], case: Path) -> None:
    """Bytes that are no ``ModelInferRequest`` are INVALID_ARGUMENT, never INTERNAL."""
    import grpc

    pb: Any = _pb()
    good = pb.ModelInferRequest(
        model_name="medseg",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="nifti", datatype="BYTES", shape=[1]),
            pb.ModelInferRequest.InferInputTensor(name="other", datatype="BYTES", shape=[1]),
        ],
        raw_input_contents=[b"\0" * 8],
    ).SerializeToString()
    with grpc.insecure_channel(server["grpc"]) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        for name, message in {
            "truncated": good[:-3],
            "not protobuf": b"\xff" * 40,
            "two inputs, one raw tensor": good,
        }.items():
            with pytest.raises(grpc.RpcError) as err:
                call(message, timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err.value)
    assert predict(server["grpc"], [case], grpc=True).volumes_ml.keys() == set(REGIONS)


def test_concurrent_requests_queue_and_all_succeed(server: dict[str, str], case: Path) -> None:
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: predict(server["rest"], [case]), range(4)))
    assert len({tuple(r.volumes_ml.values()) for r in results}) == 1


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    st.one_of(
        st.binary(max_size=300),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
            lambda kids: (
                st.lists(kids, max_size=4)
                | st.dictionaries(
                    st.sampled_from(
                        [
                            "inputs",
                            "name",
                            "datatype",
                            "shape",
                            "data",
                            "parameters",
                            "binary_data_size",
                            "outputs",
                            "id",
                        ]
                    ),
                    kids,
                    max_size=5,
                )
            ),
            max_leaves=20,
        ).map(lambda doc: json.dumps(doc).encode()),
    ),
    # Header values an HTTP client can send: visible ASCII (h11 refuses control characters and
    # leading or trailing blanks before anything reaches the server).
    st.one_of(
        st.none(),
        st.integers(-5, 400).map(str),
        st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=4),
    ),
)
def test_fuzzed_rest_bodies_never_get_a_5xx(
    server: dict[str, str], body: bytes, header: str | None
) -> None:
    headers = {HEADER: header} if header is not None else {}
    r = httpx.post(
        f"{server['rest']}/v2/models/medseg/infer", content=body, headers=headers, timeout=60
    )
    assert r.status_code < 500, (body[:200], header, r.text)


def test_model_from_s3_and_load_errors(
    model_dir: Path, storage: Storage, bucket: str, tmp_path: Path
) -> None:
    from model_server.predictor import MedsegPredictor

    for f in ("model.pt", "model.yaml"):
        storage.put_file(f"{bucket}/models/m/v1/{f}", model_dir / f)
    model = MedsegPredictor("m", f"{bucket}/models/m/v1", storage=storage)
    assert model.load() and model.ready
    # a registered version (its card holds the files' sha256s) is named by name and version
    sha = hashlib.sha256((model_dir / "model.pt").read_bytes()).hexdigest()
    card = {"name": "m", "version": "v1", "files": {"model.pt": sha}}
    storage.put_json(f"{bucket}/models/m/v1/model_card.json", card)
    model = MedsegPredictor("m", f"{bucket}/models/m/v1", storage=storage)
    assert model.load() and model.identity == {"model_version": "m@v1", "model_sha256": sha}
    with pytest.raises(RuntimeError, match="is not a model artifact"):
        MedsegPredictor("m", str(tmp_path)).load()
    (tmp_path / "model.yaml").write_text((model_dir / "model.yaml").read_text())
    (tmp_path / "model.pt").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="does not fit"):
        MedsegPredictor("m", str(tmp_path)).load()


def test_binary_response_framing(server: dict[str, str], case: Path) -> None:
    """Outputs requested as binary come after the JSON header, in the order listed."""
    blobs = [next(case.glob(f"*_{m}.nii.gz")).read_bytes() for m in ("t1", "t1ce", "t2", "flair")]
    body, headers = _binary_request(
        [({"name": "nifti", "datatype": "BYTES", "shape": [4]}, serialize_bytes(blobs))],
        outputs=[{"name": "volumes_ml", "parameters": {"binary_data": True}}],
    )
    r = httpx.post(
        f"{server['rest']}/v2/models/medseg/infer", content=body, headers=headers, timeout=60
    )
    assert r.status_code == 200, r.text
    n = int(r.headers[HEADER])
    doc = orjson.loads(r.content[:n])
    assert [o["name"] for o in doc["outputs"]] == ["volumes_ml"]
    assert doc["outputs"][0]["parameters"]["binary_data_size"] == 12 == len(r.content) - n
    vols = struct.unpack("<3f", r.content[n:])
    assert all(v >= 0 for v in vols)


def test_predict_command_over_rest_and_grpc(
    server: dict[str, str], case: Path, tmp_path: Path
) -> None:
    """``medseg predict`` as a user runs it (its flags must not reach kserve's own parser)."""
    runs = {
        "rest": ["--url", server["rest"]],
        "grpc": ["--url", server["grpc"], "--grpc", "--labels", "msd"],
    }
    for name, extra in runs.items():
        out = tmp_path / f"{name}.nii.gz"
        done = subprocess.run(
            [sys.executable, "-m", "medseg", "predict", str(case), "--out", str(out), *extra],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "tumour volumes" in done.stdout and "latency" in done.stdout
        assert _mask(out.read_bytes()).shape == _case_array(case)[0].shape[1:]
