"""medseg's server stack (REST route, gRPC servicer, limits) with a trivial model: the wire alone.

``python benchmarks/echo_server.py HTTP_PORT GRPC_PORT``: the model answers one UINT8 output
``mask`` of ``3/16`` of its input's bytes (the ratio of a ``[3, X, Y, Z]`` uint8 mask set to a
``[4, X, Y, Z]`` FP32 case), whatever the input (an FP32 tensor or a BYTES element), with no
compute and no copy of the input.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from medseg.core.settings import ServerLimits
from medseg.serving.kserve_import import clean_argv


def main() -> None:
    http_port, grpc_port = int(sys.argv[1]), int(sys.argv[2])
    with clean_argv([]):
        import kserve.model_server as ks
        from kserve import Model
        from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    from model_server.kserve_server import MedsegModelServer
    from model_server.memory import limit_malloc_arenas
    from model_server.rest import InflightBudget, install

    class Echo(Model):
        def load(self) -> bool:
            self.ready = True
            return True

        async def predict(self, payload: InferRequest, *args: Any, **kwargs: Any) -> InferResponse:
            inp = payload.inputs[0]
            raw = getattr(inp, "_raw_data", None)
            if raw is not None:
                size = len(memoryview(raw).cast("B"))
            else:  # BYTES elements, viewed in the request body
                size = sum(len(b) for b in np.asarray(inp._data, dtype=np.object_).ravel())
            out = InferOutput(name="mask", shape=[size * 3 // 16], datatype="UINT8")
            out.set_data_from_numpy(np.zeros(size * 3 // 16, np.uint8), binary_data=True)
            return InferResponse(
                model_name=self.name,
                infer_outputs=[out],
                response_id=payload.id,
                use_binary_outputs=True,
            )

    limits = ServerLimits(max_request_mb=1024, max_inflight_mb=1024)
    limit_malloc_arenas(limits.malloc_arenas)
    model = Echo("echo")
    model.load()
    budget = InflightBudget(limits.max_inflight_bytes)
    server = MedsegModelServer(limits, budget, http_port=http_port, grpc_port=grpc_port)
    install(ks.app, server.dataplane, limits, budget)
    server.start([model])


if __name__ == "__main__":
    main()
