"""A minimal INT8 Q/DQ rewrite for tests: MatMul weights [K, N] -> int8 + DequantizeLinear
(symmetric, zero point 0, per output channel = axis 1). Scales take the weight's dtype."""

from __future__ import annotations

import numpy as np


def quantize_weights_qdq(model):
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    inits = {i.name: i for i in g.initializer}
    new_nodes, done = [], {}
    for node in g.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            name = node.input[1]
            if name not in done:
                w = numpy_helper.to_array(inits[name])
                scale = (np.abs(w.astype(np.float32)).max(axis=0) / 127.0).clip(1e-8).astype(w.dtype)
                q = np.clip(np.round(w.astype(np.float32) / scale.astype(np.float32)), -127, 127).astype(np.int8)
                g.initializer.remove(inits[name])
                g.initializer.extend([numpy_helper.from_array(q, f"{name}.int8"),
                                      numpy_helper.from_array(scale, f"{name}.scale")])
                new_nodes.append(helper.make_node("DequantizeLinear", [f"{name}.int8", f"{name}.scale"],
                                                  [f"{name}.dq"], axis=1, name=f"{name}.dq_node"))
                done[name] = f"{name}.dq"
            node.input[1] = done[name]
        new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    return out
