"""llama-trt: LLaMA checkpoint -> ONNX with fused RoPE/RMSNorm plugin nodes -> TensorRT.

CPU installs must take the CPU torch wheel: install with
``pip install torch==2.13.0 -e ".[dev]"`` (see README). torch is not pinned here so
GPU machines keep their CUDA build.
"""

from setuptools import find_packages, setup

setup(
    name="llama-trt",
    version="0.1.0",
    description="Take a LLaMA-family checkpoint to a validated, fast TensorRT / ONNX Runtime deployment",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["llama_trt", "llama_trt.*"]),
    install_requires=[
        "torch>=2.6",
        "numpy>=1.24",
        "click>=8.1",
        "rich>=13",
        "tqdm>=4.60",
        "safetensors>=0.4",
        "onnx>=1.18",
        "onnxscript>=0.5",
        "onnxruntime>=1.22",
        "polygraphy>=0.49",
        "matplotlib>=3.7",
        "tokenizers>=0.19",
        "sentencepiece>=0.2",
    ],
    extras_require={
        # TensorRT for RTX: builds engines ahead-of-time even on a CPU-only machine.
        "rtx": ["tensorrt-rtx-cu13-libs", "tensorrt-rtx-cu13-bindings"],
        # GPU runtime pieces: CUDA ONNX Runtime and Triton kernels.
        "gpu": ["onnxruntime-gpu", "triton"],
        # Triton kernels; on a CPU-only machine they run in the interpreter (TRITON_INTERPRET=1).
        "kernels": ["triton"],
        # The real-model path: GGUF checkpoints and the transformers reference conversion.
        "real": ["gguf>=0.10", "transformers>=4.45", "accelerate>=0.30"],
        # A real Triton Inference Server (the tritonserver binary + python backend shipped in the
        # nvidia-pytriton wheel) for `llama-trt triton-serve`; the wheel pins numpy<2, which its
        # python backend stub needs (it corrupts tensors under numpy 2).
        "triton": ["nvidia-pytriton>=0.7,<0.8", "numpy<2", "tritonclient[grpc,http]>=2.40"],
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "prometheus-client>=0.20", "sse-starlette>=2"],
        "dev": [
            "pytest>=8",
            "pytest-timeout>=2",
            "transformers>=4.45",
            "gguf>=0.10",
            "accelerate>=0.30",
            "hypothesis>=6.100",
            "httpx>=0.27",
            "openai>=1.30",
            "fastapi>=0.110",
            "uvicorn>=0.29",
            "prometheus-client>=0.20",
            "sse-starlette>=2",
            "tritonclient[grpc,http]>=2.40",  # Triton's model_config protobuf and gRPC streaming client
            "nvidia-pytriton>=0.7,<0.8",  # the real tritonserver the slow Triton tests start (brings numpy<2)
            "numpy<2",
            "kubernetes-validate>=1.28",  # schema check of deploy/k8s/*.yaml
        ],
    },
    entry_points={"console_scripts": ["llama-trt=llama_trt.cli:main"]},
)
