"""DSA ops with one dispatch each: TPU (Mosaic) kernel, GPU (Triton) kernel, or the XLA reference.

`backend=None` picks from the default device: TPU -> "pallas_tpu", GPU -> "pallas_gpu", otherwise
"xla" (`reference.py`, also the oracle every kernel is tested against). The model calls only these
functions; the kernels know nothing about the model.
"""

from pallas_kernels import reference
from pallas_kernels.dispatch import BACKENDS, resolve_backend
from pallas_kernels.indexer import indexer_scores, indexer_topk
from pallas_kernels.dense_mla import dense_mla, dense_mla_with_lse
from pallas_kernels.sparse_mla import sparse_mla, sparse_mla_cached, sparse_mla_with_lse

__all__ = ["sparse_mla", "sparse_mla_with_lse", "sparse_mla_cached", "dense_mla", "dense_mla_with_lse",
           "indexer_scores", "indexer_topk",
           "resolve_backend", "BACKENDS", "reference"]
