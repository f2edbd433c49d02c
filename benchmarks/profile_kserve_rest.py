"""Where kserve 0.21's stock REST path spends its time on a full BraTS tensor (cProfile).

Profiles, in process, the two conversions kserve's v2 REST route does around ``predict`` for one
FP32 ``[1, 4, 240, 240, 155]`` request sent with the binary data extension (136 MiB) and one
UINT8 ``[1, 3, 240, 240, 155]`` output: ``InferRequest.from_bytes`` (request decoding) and
``InferResponse.to_rest`` (response encoding, binary and JSON), next to medseg's
:func:`model_server.rest.parse_request` / :func:`model_server.rest.encode_response` on the same
bytes. Prints the wall time of each and the top functions of the stock ones.

Usage: ``python benchmarks/profile_kserve_rest.py [--shape 240 240 155]``
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from typing import Any

import numpy as np
import orjson
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from model_server.rest import encode_response, parse_request


def _timed(label: str, fn: Any, profile: bool) -> Any:
    prof = cProfile.Profile() if profile else None
    t = time.perf_counter()
    if prof:
        prof.enable()
    out = fn()
    if prof:
        prof.disable()
    print(f"{label:<48} {time.perf_counter() - t:7.2f} s")
    if prof:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(6)
        lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
        start = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("ncalls"))
        print("\n".join("      " + ln for ln in lines[start : start + 7]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(240, 240, 155))
    args = parser.parse_args()
    x = np.random.default_rng(0).random((1, 4, *args.shape), dtype=np.float32)
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": list(x.shape),
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes},
                }
            ],
            "outputs": [{"name": "mask", "parameters": {"binary_data": True}}],
        }
    )
    body = head + x.tobytes()
    print(f"request {len(body) / 2**20:.0f} MiB\n")
    stock = _timed(
        "kserve InferRequest.from_bytes",
        lambda: InferRequest.from_bytes(body, len(head), "m"),
        profile=True,
    )
    ours = _timed("medseg parse_request", lambda: parse_request(body, len(head), "m"), False)
    assert np.array_equal(ours.inputs[0].as_numpy(), stock.inputs[0].as_numpy())

    mask = np.zeros((1, 3, *args.shape), np.uint8)

    def response(binary: bool) -> InferResponse:
        out = InferOutput(name="mask", shape=list(mask.shape), datatype="UINT8")
        out.set_data_from_numpy(mask, binary_data=binary)
        return InferResponse(model_name="m", infer_outputs=[out], response_id="1")

    for binary in (True, False):
        res = response(binary)
        _timed(f"kserve InferResponse.to_rest (binary={binary})", res.to_rest, profile=not binary)
    _timed(
        "medseg encode_response (binary)",
        lambda: encode_response(response(True), ours, binary_inputs=True),
        False,
    )


if __name__ == "__main__":
    main()
