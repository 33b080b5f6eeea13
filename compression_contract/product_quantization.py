"""k-means on the rows of a matrix, in torch: the codebooks of product quantization, and the
defaults of iterative product quantization.

Deterministic for a generator: the initial centroids are distinct blocks drawn with it, the
iterations (Lloyd's) draw nothing. An empty cluster takes over half of the most populated one:
both centroids move apart by 1e-3 of the points' spread in each dimension and the next
assignment splits its blocks (fairseq's rule for iPQ). The distances are computed in chunks, so memory stays at
``chunk x k`` floats whatever the number of blocks.

The defaults of iterative product quantization for a translation Transformer (Stock et al.;
fairseq's): the stages in which groups of layers are quantized (feed-forward, then embeddings
with the tied output projection, then attention), and columns per block (8; 4 in attention).
"""

from __future__ import annotations

import torch

__all__ = ["DEFAULT_BLOCK_SIZE", "DEFAULT_BLOCK_SIZES", "DEFAULT_STAGES", "kmeans", "learn_codebook", "nearest_centroids"]

# fairseq's order for a translation Transformer (nmt_lightning's module names; any model gives its own globs).
DEFAULT_STAGES = (("*.ffn.*",), ("*embed*", "*output_projection"), ("*attn.*",))
DEFAULT_BLOCK_SIZE = 8
DEFAULT_BLOCK_SIZES = {"*attn.*": 4}  # glob -> columns per block, first match wins


def nearest_centroids(points: torch.Tensor, centroids: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """points (n, d), centroids (k, d) -> (n,) index of each point's nearest centroid (squared L2)."""
    found = []
    for start in range(0, len(points), chunk):
        found.append(torch.cdist(points[start : start + chunk], centroids).argmin(dim=1))
    return torch.cat(found)


def kmeans(points: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """points (n, d) -> (centroids (k, d), assignments (n,)), each point assigned its nearest
    centroid. Needs k <= n. Runs in float32 on the points' device."""
    points = points.detach().float()
    count = len(points)
    if not 1 <= k <= count:
        raise ValueError(f"k-means needs 1 <= k <= {count} points, got k={k}")
    first = torch.randperm(count, generator=generator)[:k].to(points.device)
    centroids = points[first].clone()
    offset = 1e-3 * points.std(dim=0).clamp(min=1e-8)  # (d,): how far a split moves the two halves apart
    for _ in range(iterations):
        assignments = nearest_centroids(points, centroids)
        sizes = torch.bincount(assignments, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assignments, points)
        filled = sizes > 0
        centroids[filled] = sums[filled] / sizes[filled].unsqueeze(1).float()
        for empty in (~filled).nonzero().flatten().tolist():
            largest = int(sizes.argmax())
            centroids[empty] = centroids[largest] + offset
            centroids[largest] = centroids[largest] - offset
            sizes[largest] //= 2
            sizes[empty] = sizes[largest]
    return centroids, nearest_centroids(points, centroids)


def learn_codebook(weight: torch.Tensor, block_size: int, k: int, iterations: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (rows, columns) cut into blocks of ``block_size`` columns -> (codebook (k', block_size),
    assignments (rows, columns / block_size)), k' = min(k, number of blocks)."""
    blocks = weight.detach().float().reshape(-1, block_size)
    centroids, assignments = kmeans(blocks, min(k, len(blocks)), iterations, generator)
    return centroids, assignments.view(weight.shape[0], weight.shape[1] // block_size)
