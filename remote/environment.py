"""What the job trained with, as MLflow tags: enough to rebuild its software stack (the run's reproducible record)."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess

NONE = "none"
TAG_PREFIX = "env."


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return NONE


def nvidia_driver() -> str:
    """The NVIDIA driver's version as nvidia-smi reports it; "none" on an instance without one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return NONE
    try:
        out = subprocess.run(
            [smi, "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return NONE
    return out.splitlines()[0].strip() if out.strip() else NONE


def environment_tags() -> dict[str, str]:
    """torch, torchvision, mlflow, CUDA, cuDNN and the NVIDIA driver; "none" for what this machine lacks."""
    import torch

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    values = {
        "torch_version": torch.__version__,
        "torchvision_version": _version("torchvision"),
        "mlflow_version": _version("mlflow"),
        "cuda_version": torch.version.cuda or NONE,
        "cudnn_version": str(cudnn) if cudnn else NONE,
        "nvidia_driver_version": nvidia_driver(),
    }
    return {TAG_PREFIX + key: value for key, value in values.items()}
