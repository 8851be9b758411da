"""A test double of NVML (the `pynvml` module of nvidia-ml-py) with two fake GPUs.

Put this folder on PYTHONPATH to exercise the trainer's GPU-telemetry path on a machine without a GPU: the values
are fixed and recognisable, so a test can check they travel unchanged through /metrics and Prometheus.
"""

NVML_TEMPERATURE_GPU = 0


class _Utilization:
    gpu = 87  # percent


class _Memory:
    used = 40 * 2**30
    total = 80 * 2**30


def nvmlInit():  # noqa: N802 - NVML's names
    return None


def nvmlDeviceGetCount():  # noqa: N802
    return 2


def nvmlDeviceGetHandleByIndex(index):  # noqa: N802
    return index


def nvmlDeviceGetName(handle):  # noqa: N802
    return "NVIDIA H100 80GB HBM3"


def nvmlDeviceGetUtilizationRates(handle):  # noqa: N802
    return _Utilization()


def nvmlDeviceGetMemoryInfo(handle):  # noqa: N802
    return _Memory()


def nvmlDeviceGetPowerUsage(handle):  # noqa: N802
    return 350_000 + 1000 * handle  # milliwatts


def nvmlDeviceGetTemperature(handle, sensor):  # noqa: N802
    return 61 + handle
