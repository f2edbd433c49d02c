"""A kserve ModelServer with a trivial model, to time the protocol layers alone.

``python benchmarks/echo_server.py HTTP_PORT GRPC_PORT stock|fast``: the model returns a
``[1, 3, X, Y, Z]`` uint8 output (the size of a mask set) for an ``[1, 4, X, Y, Z]`` input, with
no compute. ``stock`` is kserve's own REST handling; ``fast`` installs medseg's REST route.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np


def main() -> None:
    http_port, grpc_port, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    limit = 512 * 1024 * 1024
    import kserve.model_server as ks
    from kserve import Model
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

    ks.args.grpc_max_send_message_length = limit
    ks.args.grpc_max_receive_message_length = limit

    class Echo(Model):
        def load(self) -> bool:
            self.ready = True
            return True

        async def predict(self, payload: InferRequest, *args: Any, **kwargs: Any) -> InferResponse:
            x = payload.inputs[0].as_numpy()
            shape = [1, 3, *x.shape[2:]]
            out = InferOutput(name="mask", shape=shape, datatype="UINT8")
            out.set_data_from_numpy(np.zeros(shape, np.uint8), binary_data=True)
            return InferResponse(
                model_name=self.name,
                infer_outputs=[out],
                response_id=payload.id,
                use_binary_outputs=True,
            )

    model = Echo("echo")
    model.load()
    server = ks.ModelServer(http_port=http_port, grpc_port=grpc_port, workers=1)
    if mode == "fast":
        from model_server.rest import install

        install(ks.app, server.dataplane, limit)
    server.start([model])


if __name__ == "__main__":
    main()
