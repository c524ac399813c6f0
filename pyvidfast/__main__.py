"""Command line: ``python -m pyvidfast {info,samples,demo}``."""

import argparse
import platform
import sys


def _info(args) -> None:
    import torch

    import pyvidfast

    info = pyvidfast.build_info()
    print(f"pyvidfast {pyvidfast.__version__}  ({pyvidfast.library_path})")
    print(f"python {platform.python_version()}, torch {torch.__version__} (built against {info['torch']})")
    print(f"CUDA kernels built: {'yes' if info['cuda_kernels'] else 'no'}"
          + (f", architectures {', '.join(info['cuda_archs'])}" if info["cuda_kernels"] else ""))
    print(f"NVTX ranges compiled in: {'yes' if info['nvtx'] else 'no'}")
    print(f"Frame reader (FFmpeg) built: {'yes' if info['video_reader'] else 'no'}")
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        print(f"GPU present: yes ({', '.join(names)})")
    else:
        print("GPU present: no")
    print(f"CPU threads: {torch.get_num_threads()}")
    from pyvidfast.ops.varlen_attention import cpu_path

    print(f"varlen_attention CPU path: {cpu_path()} (ATen CPU capability {torch.backends.cpu.get_cpu_capability()})")


def _samples(args) -> None:
    from pyvidfast import samples

    for path in samples.all_samples():
        print(path)


def _demo(args) -> None:
    from pyvidfast import demo

    demo.main(args)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="pyvidfast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, CUDA kernels built and architectures, frame reader built, GPU presence, "
                               "CPU paths").set_defaults(func=_info)
    sub.add_parser("samples", help="fetch and check the real sample clips").set_defaults(func=_samples)
    demo = sub.add_parser("demo", help="RLT on a real clip, VideoMAE V2 dense vs packed, PNG of kept patches")
    demo.add_argument("--clip", default="balle-jbart.mp4", help="sample clip name or a video path")
    demo.add_argument("--out", default="demo_out", help="folder for the PNG")
    demo.add_argument("--threshold", type=float, default=0.1)
    demo.add_argument("--model", default="videomae_vit_base_patch16_224", help="model to run ('' to skip)")
    demo.add_argument("--checkpoint", default=None, help="official or Hugging Face checkpoint (else random weights)")
    demo.add_argument("--repeats", type=int, default=3, help="timed runs of each path (median)")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
