"""Typed settings of the selection stages (the ``embed:``, ``cluster:`` and ``select:`` sections)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hetray.settings import Strict


class EmbedConfig(Strict):
    model: str = Field(default="all-minilm-l6-v2", description="sentence-transformers name or path")
    batch_size: int = Field(default=256, ge=1, description="prompts per forward pass (an actor call sorts up to 16 batches by length)")
    num_actors: int = Field(default=1, ge=1, description="embedding actors (each loads the model once)")
    num_gpus_per_actor: float | Literal["auto"] = Field(
        default="auto", description="auto: 1 when the cluster has GPUs, else run on CPU"
    )
    num_cpus_per_actor: float = Field(default=1, gt=0)


class ClusterConfig(Strict):
    n_clusters: int = Field(default=10, ge=1, description="k (paper: 10)")
    n_init: int = Field(default=10, ge=1, description="restarts; the lowest inertia wins (paper: 10)")
    max_iter: int = Field(default=100, ge=1)
    tol: float = Field(default=1e-4, ge=0, description="stop when centroids move less than this (relative)")
    init: Literal["k-means++", "k-means||"] = "k-means++"
    sample_size: int = Field(
        default=100_000, ge=1,
        description="most points drawn for initialisation (k-means++ reads max(10,000, 20 x n_clusters) of them)",
    )
    batch_size: int = Field(default=65_536, ge=1, description="vectors per partial-sum batch")
    backend: Literal["auto", "faiss", "numpy"] = Field(
        default="auto",
        description="how a batch finds each vector's nearest centroid: faiss (a search per restart), "
        "numpy (one matmul for all restarts), auto: faiss from 256 clusters up, numpy below (the faster one)",
    )


class SelectConfig(Strict):
    fraction: float = Field(default=1.0, gt=0, le=1, description="kept share of each cluster (paper: 0.2/0.4/0.6/1.0)")
    stratify: bool = Field(default=True, description="every source keeps its share (paper A.3)")
    quality_normalization: Literal["none", "percentile"] = Field(
        default="none", description="percentile: rank quality within each source before comparing"
    )
    dedup_threshold: float | None = Field(
        default=None, gt=0, le=1, description="drop near-duplicate prompts in a cluster above this cosine"
    )
    examples_per_cluster: int = Field(default=3, ge=0, description="example prompts in the report")
    keep_unscored: bool = Field(
        default=False,
        description="sources without quality scores (WinoGrande, WinoBias, WinoGender) are kept whole "
        "and only scored sources are cut to `fraction` (paper: 'WinoGrande ... not filtered'); "
        "False: every source, scored or not, keeps `fraction` of its pairs (paper A.3: each source keeps its share)",
    )
    sources: list[str] | None = Field(
        default=None, min_length=1, description="keep pairs of these sources only (None: all)"
    )
