"""Answers a question about a video with a Video-XL checkpoint folder (official layout).

    python -m pyvidfast.videoxl --checkpoint DIR --video movie.mp4 --prompt "What happens?" [--frames 1024]
        [--ratio 16] [--device cuda] [--dtype bfloat16]

Prints the answer, the frames used, the KV bytes kept and the time per stage, with progress bars over frame
decoding, vision encoding and the window prefill.
"""

import argparse
import sys
import time

import torch
from tqdm import tqdm

from pyvidfast.models.videoxl import VideoXL, chat_input_ids, load_video

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m pyvidfast.videoxl", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="official-layout folder: config.json, safetensors, tokenizer")
    p.add_argument("--video", required=True, help="a video file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--frames", type=int, default=None, help="frames spread uniformly (default: 1 fps, capped)")
    p.add_argument("--max-frames", type=int, default=1024, help="cap of the 1 fps sampling")
    p.add_argument("--ratio", type=int, default=None, help="fixed compression ratio (default: config.beacon_ratio)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--vision-chunk", type=int, default=32, help="frames per CLIP pass")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    times = {}

    start = time.perf_counter()
    model = VideoXL.from_pretrained(args.checkpoint, dtype=dtype, device=args.device,
                                    vision_chunk=args.vision_chunk).eval()
    if model.tokenizer is None:
        print(f"error: {args.checkpoint} has no tokenizer files", file=sys.stderr)
        return 2
    times["load"] = time.perf_counter() - start

    start = time.perf_counter()
    with tqdm(desc="decode frames", unit="frame", file=sys.stderr) as bar:
        frames = load_video(args.video, model.model.vision_tower.image_size, frames=args.frames,
                            max_frames=args.max_frames, progress=bar.update)
    times["decode"] = time.perf_counter() - start

    with torch.no_grad():
        start = time.perf_counter()
        with tqdm(total=len(frames), desc="vision", unit="frame", file=sys.stderr) as bar:
            features = model.encode_frames(frames.to(args.device, dtype), progress=bar.update)
        sync()
        times["vision"] = time.perf_counter() - start

        start = time.perf_counter()
        ids = chat_input_ids(model.tokenizer, args.prompt).to(args.device)
        with tqdm(total=len(features), desc="window prefill", unit="token", file=sys.stderr) as bar:
            result = model.prefill([ids], features=[features], ratio=args.ratio, progress=bar.update)
        sync()
        times["prefill"] = time.perf_counter() - start

        start = time.perf_counter()
        answer = "".join(model.stream_text(result, model.tokenizer, args.max_new_tokens))
        sync()
        times["generate"] = time.perf_counter() - start

    memory = result.memory
    print(answer)
    print(f"frames used: {len(frames)} ({len(features)} visual tokens, {result.window_steps} windows)")
    print(f"KV kept: {memory.nbytes()} bytes (sink {memory.sink[0]} + VST {memory.vst[0]} + text "
          f"{memory.text[0]} entries per layer)")
    print("time per stage: " + ", ".join(f"{k} {v:.3f} s" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
