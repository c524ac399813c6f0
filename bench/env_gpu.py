"""What the machine offers the GPU check: torch and its CUDA, the device, the pyvidfast build (when one exists) and
which optional packages import. Writes $OUT/env.json. Run: python -m bench.env_gpu"""

import importlib.util
import platform

import torch

from bench.common_gpu import write_result

OPTIONAL = ["pytest", "expecttest", "numpy", "nvtx", "triton", "cupy", "flash_attn", "av", "transformers"]


def main():
    facts = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
             "cuda_available": torch.cuda.is_available(), "cpu_count": __import__("os").cpu_count()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        facts["device"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": p.total_memory / 2**30,
                           "multiprocessors": p.multi_processor_count}
    facts["importable"] = {name: importlib.util.find_spec(name) is not None for name in OPTIONAL}
    facts["torch_varlen_attn"] = importlib.util.find_spec("torch.nn.attention.varlen") is not None
    facts["flex_attention"] = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    try:
        import pyvidfast

        facts["pyvidfast_build"] = pyvidfast.build_info()
    except ImportError as e:  # not built yet: the build stage comes next
        facts["pyvidfast_build"] = f"not loadable: {e}"
    for key, value in facts.items():
        print(f"{key}: {value}")
    write_result("env", {"facts": facts, "headline": f"torch {torch.__version__}, "
                         f"{facts.get('device', {}).get('name', 'no GPU')}"})


if __name__ == "__main__":
    main()
