"""group_topk versus the selection as the official FluxViT code does it in PyTorch, on CPU (and GPU if present).

Peers, on the same patch embeddings [B=8, T=16, L=256, D] with G=4 groups:
- "official": FluxViT.sparse_group_token_selection as written (clone, norm of frame differences, argsort per
  group, argsort again to restore, mask by gather), then the kept indices from the mask (nonzero).
- "torch": the same selection written lean in PyTorch (no clone, one stable sort per group, exact budget split).
The machine's limit is one copy of the input (memory bandwidth): the op must read every embedding once.
Run: python -m bench.group_topk
"""

import torch

from bench.common import copy_bandwidth, markdown_table, time_fn, write_json
import pyvidfast
from pyvidfast.ops import group_budgets, group_topk

B, T, L, G = 8, 16, 256, 4


def official_selection(x: torch.Tensor, budget: int) -> torch.Tensor:
    """The official selector's steps (masking_ratio = 1 - budget / (T * L)), returning kept indices per clip."""
    batch, frames, tokens, dim = x.shape
    masking_ratio = 1 - budget / (frames * tokens)
    v = x.detach().clone().reshape(batch * G, frames // G, tokens, dim)
    per_group = frames // G
    distance = torch.norm(v[:, : per_group - 1] - v[:, 1:], p=2, dim=3)
    importance = torch.cat((distance[:, 0, :], distance.flatten(1)), dim=1)
    ids_sorted = torch.argsort(importance, dim=1, descending=True)
    keep = int((1 - masking_ratio) * (per_group * tokens))
    ids_restore = torch.argsort(ids_sorted, dim=1)
    mask = torch.ones([batch * G, per_group * tokens], device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore).reshape(batch, frames * tokens).to(torch.bool)
    return torch.nonzero(~mask)[:, 1].reshape(batch, -1)


def torch_selection(x: torch.Tensor, budget: int, exact: bool = False) -> torch.Tensor:
    """group_topk's semantics in plain PyTorch. Timed as one would write it (float32 distances); ``exact`` sums in
    float64 and rounds to float32 as the op does, so that near-equal scores order the same for the check."""
    batch, frames, tokens, dim = x.shape
    v = x.reshape(batch, G, frames // G, tokens, dim)
    if exact:
        v = v.double()
    distance = torch.linalg.vector_norm(v[:, :, 1:] - v[:, :, :-1], dim=-1).float()
    scores = torch.cat((distance[:, :, :1], distance), dim=2).flatten(2)  # [B, G, n]
    order = torch.sort(scores, dim=2, descending=True, stable=True).indices
    n = scores.shape[2]
    kept = [order[:, g, :k] + g * n for g, k in enumerate(group_budgets(budget, G))]
    return torch.sort(torch.cat(kept, dim=1), dim=1).values


def main():
    rows, results = [], []
    # CPU at one thread and at all threads (the op and its peers alike); the GPU when there is one.
    runs = [("cpu", 1), ("cpu", torch.get_num_threads())]
    if torch.cuda.is_available() and pyvidfast.build_info()["cuda_kernels"]:
        runs.append(("cuda", torch.get_num_threads()))
    for device, threads in runs:
        torch.set_num_threads(threads)
        sync = torch.cuda.synchronize if device == "cuda" else None
        for dim in (384, 768):
            x = torch.randn(B, T, L, dim, device=device)
            if device == "cpu":
                floor = copy_bandwidth(x.numel() * x.element_size())
            for budget in (1024, 2048, 3072):
                assert torch.equal(group_topk(x, G, budget), torch_selection(x, budget, exact=True))
                t_op = time_fn(lambda: group_topk(x, G, budget), sync=sync)
                t_official = time_fn(lambda: official_selection(x, budget), sync=sync)
                t_torch = time_fn(lambda: torch_selection(x, budget), sync=sync)
                gbps = x.numel() * x.element_size() / (t_op["median_ms"] * 1e-3) / 1e9
                row = {"device": device, "threads": threads, "D": dim, "budget": budget, "op": t_op,
                       "official": t_official, "torch": t_torch, "op_gb_per_s": gbps}
                if device == "cpu":
                    row["copy"] = floor
                results.append(row)
                rows.append([device if device == "cuda" else f"cpu x{threads}", dim, budget, t_op["median_ms"],
                             t_official["median_ms"], t_torch["median_ms"], t_official["median_ms"] / t_op["median_ms"],
                             t_torch["median_ms"] / t_op["median_ms"], gbps,
                             floor["gb_per_s"] if device == "cpu" else "-"])
    table = markdown_table(["device", "D", "budget", "op ms", "official ms", "torch ms", "official / op",
                            "torch / op", "op GB/s read", "copy GB/s"], rows)
    print(f"group_topk, B={B} T={T} L={L} G={G}, float32; medians of 10")
    print(table)
    print("wrote", write_json("group_topk", {"B": B, "T": T, "L": L, "G": G, "results": results, "table": table}))


if __name__ == "__main__":
    main()
