"""llama_trt.plugins.load(): one call registers every fused op, or says what is missing."""

import importlib.util

import pytest

from llama_trt import plugins
from llama_trt.errors import BackendUnavailableError


def test_every_op_has_a_plugin_module_named_after_its_spec():
    for spec in plugins.all_specs():
        assert importlib.util.find_spec(f"llama_trt.plugins.{spec.torch_name}.trt_plugin") is not None
        assert spec.plugin_id == f"llama_trt::{spec.op_type}"


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="full TensorRT is installed")
def test_load_without_tensorrt_names_what_to_install():
    with pytest.raises(BackendUnavailableError, match="need full TensorRT with `tensorrt.plugin`"):
        plugins.load()


@pytest.mark.tensorrt
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None, reason="full TensorRT (tensorrt.plugin) not installed")
def test_load_registers_all_ops_once():
    ids = plugins.load()
    assert ids == [s.plugin_id for s in plugins.all_specs()]
    assert plugins.load() == ids  # idempotent
