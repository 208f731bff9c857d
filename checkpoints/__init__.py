"""HF safetensors <-> dsjax params: the name table, lazy validated reading, and Orbax checkpoints.

    load(path, parallel, dtype, step=) -> (config, params)   any dsjax model on disk (model_dir.py): a
                                                             converted checkpoint, a training run, an HF dir
    describe(path) -> ModelDir                               which of those it is (kind, step, tokenizer)
    load_hf(hf_dir, dtype) -> (config, params)               small models and tests, in memory
    python -m checkpoints.convert --hf_dir --out_dir         HF -> Orbax, streamed (the 671B model)
    save(ckpt_dir, params, config)                           params -> Orbax (e.g. after fine-tuning)
    python -m checkpoints.export --ckpt_dir --out_dir        any dsjax model -> HF safetensors + config.json
"""

from checkpoints.hf_load import check_checkpoint, load_hf
from checkpoints.model_dir import ModelDir, load
from checkpoints.model_dir import resolve as describe
from checkpoints.restore import save
from checkpoints.safetensors_io import CheckpointError, CheckpointReader

__all__ = ["load_hf", "load", "describe", "ModelDir", "save", "check_checkpoint", "CheckpointError",
           "CheckpointReader"]
