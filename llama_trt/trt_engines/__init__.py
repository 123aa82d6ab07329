"""Pipeline stage: trt_engines."""
