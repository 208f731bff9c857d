"""HF safetensors <-> dsjax params: the name table, lazy validated reading, and Orbax checkpoints.

    load_hf(hf_dir, dtype) -> (config, params)        small models and tests, in memory
    python -m checkpoints.convert --hf_dir --out_dir   HF -> Orbax, streamed (the 671B model)
    load(ckpt_dir, mesh, dtype) -> (config, params)    Orbax -> device, straight into the shardings
    save(ckpt_dir, params, config)                     params -> Orbax (e.g. after fine-tuning)
    python -m checkpoints.export --ckpt_dir --out_dir  Orbax -> HF safetensors + config.json
"""

from checkpoints.hf_load import check_checkpoint, load_hf
from checkpoints.restore import load, save
from checkpoints.safetensors_io import CheckpointError, CheckpointReader

__all__ = ["load_hf", "load", "save", "check_checkpoint", "CheckpointError", "CheckpointReader"]
