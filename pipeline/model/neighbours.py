"""Retrieved neighbours as conditioning: the input block of the hybrid method (docs/methods.md#hybrid).

A record's neighbour block is its top-``k`` rows of a labelled *gallery* (the training store's
embeddings and locations) by cosine similarity, laid out after the embedding in the
conditioning vector as ``[xyz (k·3), similarity (k), valid (k), support (k·6)]`` (float32; an
invalid slot, where fewer than k rows are eligible, has xyz 0, similarity 0 and valid 0). A
neighbour's support is ln(10⁻³ + the share of the neighbour set within ≈ 10, 100 and 1,000 km of
it), weighted by softmax(similarity / 0.05) and unweighted: the consensus a kernel density reads
implicitly. It depends on the search only, so it is computed here once, not at every step.

Training must see what prediction will see: a training record's own row and every gallery row
of its *place* (locations chained by links shorter than ``exclude_km``: the same place,
photographed again) are not eligible as its neighbours, since a new photo's place is, by the
splits' rule, not in the gallery. Prediction searches the whole gallery.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from geopipe.pipeline.sphere.geometry import EARTH_RADIUS_KM

__all__ = ["FEATURES_PER_NEIGHBOUR", "SIM_TEMPERATURE", "SUPPORT_KM", "neighbour_block", "split_block"]

#: Kernel scales (km) of a neighbour's support: how much of the neighbour set lies around it.
SUPPORT_KM = (10.0, 100.0, 1000.0)
#: Softmax temperature of the similarity weights of the weighted support.
SIM_TEMPERATURE = 0.05
#: Columns per neighbour in the conditioning vector: x, y, z, similarity, valid, and the support
#: (similarity-weighted and plain) at each of SUPPORT_KM.
FEATURES_PER_NEIGHBOUR = 5 + 2 * len(SUPPORT_KM)

#: Candidates searched beyond k at training, so that k remain after the exclusions; doubled
#: (up to the gallery) for the records that still have too few.
_EXTRA = 64


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def _search(q: torch.Tensor, gallery: torch.Tensor, k: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine similarities (B, k) and gallery rows (B, k) of unit queries q (B, D), in query blocks."""
    sims, rows = [], []
    for i in range(0, len(q), block):
        s, r = (q[i : i + block] @ gallery.T).topk(min(k, len(gallery)), dim=1)
        sims.append(s)
        rows.append(r)
    return torch.cat(sims), torch.cat(rows)


def neighbour_block(embeddings: torch.Tensor, gallery_emb: torch.Tensor, gallery_xyz: torch.Tensor, k: int, *,
                    groups: torch.Tensor | None = None, gallery_groups: torch.Tensor | None = None, block: int = 1024) -> torch.Tensor:
    """The (B, k·F) neighbour block of embeddings (B, D) against the gallery (N, D) / (N, 3) unit xyz.

    groups (B,) and gallery_groups (N,) int64 (training): a gallery row whose group equals the
    record's is not its neighbour — the record's own row and its place (:func:`geopipe.pipeline.
    sphere.places.place_ids`). Order: best similarity first, as ``torch.topk`` returns them.
    """
    q, g = _unit(embeddings), gallery_emb.float()
    n = len(g)
    excluding = groups is not None and gallery_groups is not None
    want = min(n, k + _EXTRA if excluding else k)
    while True:
        sims, rows = _search(q, g, want, block)
        valid = gallery_groups[rows] != groups[:, None] if excluding else torch.ones_like(sims, dtype=torch.bool)
        if want >= n or not bool((valid.sum(1) < k).any()):
            break
        want = min(n, 2 * want)  # rare: a place with more rows than the candidates searched
    # keep the best k valid candidates per record, in similarity order
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :k]
    sims, rows, valid = sims.gather(1, order), rows.gather(1, order), valid.gather(1, order)
    if sims.shape[1] < k:  # a gallery smaller than k
        pad = k - sims.shape[1]
        sims, rows = F.pad(sims, (0, pad)), F.pad(rows, (0, pad))
        valid = F.pad(valid, (0, pad), value=False)
    xyz = gallery_xyz[rows].float() * valid[..., None]
    return torch.cat([xyz.reshape(len(q), -1), sims * valid, valid.float(), _support(xyz, sims, valid).reshape(len(q), -1)], dim=1)


def _support(xyz: torch.Tensor, sim: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, k, 6) support of each neighbour slot (see the module docstring)."""
    masked = sim.masked_fill(~valid, -1e4)
    attn = torch.softmax(masked / SIM_TEMPERATURE, dim=1) * valid
    d_km = EARTH_RADIUS_KM * torch.cdist(xyz, xyz)  # chord, km: close to the arc below 1,000 km
    out = []
    for r in SUPPORT_KM:
        kern = torch.exp(-0.5 * (d_km / r) ** 2) * valid[:, None, :]
        out.append(torch.log(1e-3 + (kern * attn[:, None, :]).sum(-1)))
        out.append(torch.log(1e-3 + kern.sum(-1) / valid.shape[1]))
    return torch.stack(out, dim=-1) * valid[..., None]


def split_block(block: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, k·F) neighbour block → xyz (B, k, 3), similarity (B, k), valid (B, k) bool, support (B, k, 6)."""
    xyz = block[:, : 3 * k].reshape(len(block), k, 3)
    support = block[:, 5 * k :].reshape(len(block), k, FEATURES_PER_NEIGHBOUR - 5)
    return xyz, block[:, 3 * k : 4 * k], block[:, 4 * k : 5 * k] > 0.5, support
