"""HisToGene (Pang et al. 2021): a vision transformer over all spot patches of a slide.

Re-implemented from the paper and the authors' ``SpatialTransformer``: every spot's RGB
patch is flattened and linearly embedded; learned embeddings of the spot's integer array
column (x) and row (y) are added; pre-norm transformer encoder layers (GELU feed-forward of
width ``2 * dim``, dropout, embedding dropout) attend across all spots of one slide; a
LayerNorm + linear head maps each token to all genes. Loss: MSE on log1p-normalised
expression; Adam; one slide per step, no augmentation (as in the authors' her2st loader).

Deviations: pixels are scaled to [0, 1] (the authors feed 0–255 floats); attention uses
``dim // heads`` per head (the authors use 64 per head, equal to ``dim // heads`` at the
paper's ``dim=1024, heads=16``); the defaults are small so that CPU training takes minutes.
"""
from __future__ import annotations

import numpy as np
import torch
from anndata import AnnData
from torch import nn

from .._errors import InputError
from ._base import PointPredictor


class _SpatialTransformer(nn.Module):
    def __init__(self, patch_dim: int, n_genes: int, dim: int, depth: int, heads: int, dropout: float, n_pos: int):
        super().__init__()
        self.patch_embedding = nn.Linear(patch_dim, dim)
        self.x_embed = nn.Embedding(n_pos, dim)
        self.y_embed = nn.Embedding(n_pos, dim)
        self.emb_dropout = nn.Dropout(dropout)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=2 * dim, dropout=dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.gene_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, n_genes))

    def forward(self, patches: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``patches`` (1, n, patch_dim) in [0, 1], ``pos`` (1, n, 2) long -> (1, n, n_genes)."""
        h = self.patch_embedding(patches) + self.x_embed(pos[..., 0]) + self.y_embed(pos[..., 1])
        return self.gene_head(self.transformer(self.emb_dropout(h)))


class HisToGene(PointPredictor):
    """HisToGene: patches + grid positions of a whole slide -> expression of every spot.

    Parameters
    ----------
    dim
        Token width (paper: 1024).
    depth
        Transformer encoder layers (paper: 8).
    heads
        Attention heads; must divide ``dim`` (paper: 16).
    dropout
        Dropout in attention, feed-forward and on the embeddings (paper: 0.1).
    n_pos
        Size of each position-embedding table: grid coordinates must lie in ``[0, n_pos)``.
    device
        Torch device; default ``"cuda"`` when available, else ``"cpu"``.
    seed
        Seeds the weight initialisation, dropout and slide order.
    """

    def __init__(
        self,
        dim: int = 128,
        depth: int = 2,
        heads: int = 4,
        dropout: float = 0.1,
        n_pos: int = 64,
        device: str | torch.device | None = None,
        seed: int = 0,
    ):
        if dim % heads:
            raise InputError(f"heads ({heads}) must divide dim ({dim})")
        self.dim, self.depth, self.heads, self.dropout, self.n_pos = dim, depth, heads, dropout, n_pos
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.seed = seed

    def _inputs(
        self, adata: AnnData, patches: np.ndarray | None, patch_key: str, coord_key, slide_key: str | None
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """Patches ``(n, H, W, 3)``, positions ``(n, 2)`` int64 and spot indices per slide."""
        if patches is None:
            if patch_key not in adata.obsm:
                raise InputError(f"no patches given and {patch_key!r} is not in adata.obsm")
            patches = adata.obsm[patch_key]
        patches = np.asarray(patches)
        if patches.ndim != 4 or patches.shape[0] != adata.n_obs or patches.shape[-1] != 3:
            raise InputError(f"patches must be (n_spots={adata.n_obs}, H, W, 3), got shape {patches.shape}")
        if isinstance(coord_key, str):
            if coord_key not in adata.obsm:
                raise InputError(f"coord_key {coord_key!r} is not in adata.obsm")
            coords = np.asarray(adata.obsm[coord_key])[:, :2]
        else:
            missing = [c for c in coord_key if c not in adata.obs]
            if missing:
                raise InputError(f"coordinate columns {missing} are not in adata.obs")
            coords = adata.obs[list(coord_key)].to_numpy()
        coords = np.asarray(coords, dtype=np.float64)
        if not np.allclose(coords, np.round(coords)):
            raise InputError(f"HisToGene needs integer grid (array) coordinates, got non-integers from {coord_key!r}")
        pos = np.round(coords).astype(np.int64)
        if pos.min() < 0 or pos.max() >= self.n_pos:
            raise InputError(f"grid coordinates must lie in [0, {self.n_pos}), got [{pos.min()}, {pos.max()}]")
        if slide_key is None:
            groups = [np.arange(adata.n_obs)]
        elif slide_key not in adata.obs:
            raise InputError(f"slide_key {slide_key!r} is not a column of adata.obs")
        else:
            slides = adata.obs[slide_key].astype(str).to_numpy()
            groups = [np.flatnonzero(slides == s) for s in np.unique(slides)]
        return patches, pos, groups

    def _tensor(self, patches: np.ndarray, pos: np.ndarray, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        flat = patches[idx].reshape(1, len(idx), -1)
        x = torch.as_tensor(flat, device=self.device).float().div_(255.0)
        return x, torch.as_tensor(pos[idx], device=self.device).unsqueeze(0)

    def fit(
        self,
        adata: AnnData,
        patches: np.ndarray | None = None,
        patch_key: str = "patches",
        coord_key: str | tuple[str, str] = "spatial",
        slide_key: str | None = "slide",
        layer: str | None = None,
        epochs: int = 50,
        lr: float = 1e-4,
    ) -> HisToGene:
        """Train on the training slides, one slide (all its spots) per optimisation step.

        Parameters
        ----------
        adata
            Training spots with raw counts in ``X`` (or ``layers[layer]``).
        patches
            uint8 RGB patches ``(n_spots, H, W, 3)`` in the order of ``adata``; default
            ``adata.obsm[patch_key]``.
        patch_key
            ``obsm`` key of the patches when ``patches`` is not given.
        coord_key
            Integer array (grid) coordinates ``(x, y)``: an ``obsm`` key (first two columns)
            or a pair of ``obs`` columns.
        slide_key
            ``obs`` column of the slide: each slide is one sequence. ``None``: one sequence.
        layer
            Layer holding the counts; ``None`` uses ``X``.
        epochs
            Passes over all training slides (paper: 100; 50 here takes ~3 min on 2 CPU cores
            for ~1,000 spots of 112 px and ~14k genes).
        lr
            Adam learning rate.

        Returns
        -------
        ``self``, with ``history_`` (mean training MSE per epoch), ``patch_shape_`` and
        ``var_names_``.
        """
        y = self._fit_target(adata, layer)
        patches, pos, groups = self._inputs(adata, patches, patch_key, coord_key, slide_key)
        self.patch_shape_ = patches.shape[1:]
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        self.module_ = _SpatialTransformer(
            int(np.prod(self.patch_shape_)), y.shape[1], self.dim, self.depth, self.heads, self.dropout, self.n_pos
        ).to(self.device)
        opt = torch.optim.Adam(self.module_.parameters(), lr=lr)
        data = [(*self._tensor(patches, pos, g), torch.as_tensor(y[g], device=self.device).unsqueeze(0)) for g in groups]
        self.history_ = []
        self.module_.train()
        for _ in range(epochs):
            losses = []
            for i in rng.permutation(len(data)):
                x, p, target = data[i]
                loss = nn.functional.mse_loss(self.module_(x, p), target)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            self.history_.append(float(np.mean(losses)))
        return self

    @torch.no_grad()
    def predict(
        self,
        adata: AnnData,
        patches: np.ndarray | None = None,
        patch_key: str = "patches",
        coord_key: str | tuple[str, str] = "spatial",
        slide_key: str | None = "slide",
    ) -> np.ndarray:
        """Predicted log1p-normalised expression, float32 ``(adata.n_obs, n_genes)``.

        Each slide of ``adata`` is one sequence; inputs as in :meth:`fit` (counts not needed).
        """
        self._check_fitted()
        patches, pos, groups = self._inputs(adata, patches, patch_key, coord_key, slide_key)
        if patches.shape[1:] != self.patch_shape_:
            raise InputError(f"patches have shape {patches.shape[1:]} per spot, the model was fit on {self.patch_shape_}")
        self.module_.eval()
        out = np.empty((adata.n_obs, len(self.var_names_)), dtype=np.float32)
        for g in groups:
            out[g] = self.module_(*self._tensor(patches, pos, g))[0].cpu().numpy()
        return out
