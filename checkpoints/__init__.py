"""HF safetensors <-> dsjax params: the name table, lazy validated reading, and loading.

    load_hf(hf_dir, dtype) -> (config, params)     small models and tests, in memory
"""

from checkpoints.hf_load import check_checkpoint, load_hf
from checkpoints.safetensors_io import CheckpointError, CheckpointReader

__all__ = ["load_hf", "check_checkpoint", "CheckpointError", "CheckpointReader"]
