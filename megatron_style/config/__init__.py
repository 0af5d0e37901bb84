"""Configuration: one dataclass per section, presets, and a strict YAML/JSON loader.

A run is described by one file (`configs/pretrain/*.yaml`) plus `key.sub=value` overrides on
the command line. Everything is checked before any process group starts: an unknown key or a
bad value raises `ConfigError` naming the key and what would be accepted.

  errors.py    ConfigError
  fields.py    ranges declared on the fields (`bounded`) and the one check of them
  model.py     ModelConfig and the named presets
  data.py      DataConfig: streams, masking, tokenizers, bad-data limits
  train.py     optimizer, parallelism, checkpoints, logging, guards
  pretrain.py  PretrainConfig: the whole run
  checks.py    every rule between fields
  loading.py   files and overrides -> validated dataclasses
"""
from megatron_style.config.data import (PILLOW_BOMB_PIXELS, STREAMS, DataConfig, MaskingConfig,
                                        StreamConfig, StreamName, TokenizerConfig)
from megatron_style.config.errors import ConfigError
from megatron_style.config.loading import (apply_overrides, dump_yaml, from_dict, load_config,
                                           model_config, parse_override, read_config_file,
                                           read_overrides_file, to_dict)
from megatron_style.config.model import MODEL_PRESETS, AttentionLayout, ModelConfig
from megatron_style.config.pretrain import PretrainConfig
from megatron_style.config.train import (CheckpointConfig, GuardConfig, LoggingConfig,
                                         OptimConfig, ParallelConfig)

__all__ = ["ConfigError", "MODEL_PRESETS", "AttentionLayout", "ModelConfig", "STREAMS",
           "StreamName", "StreamConfig", "MaskingConfig", "TokenizerConfig", "DataConfig",
           "PILLOW_BOMB_PIXELS", "OptimConfig", "ParallelConfig", "CheckpointConfig",
           "LoggingConfig", "GuardConfig", "PretrainConfig", "load_config", "model_config",
           "from_dict", "to_dict", "dump_yaml", "parse_override", "apply_overrides",
           "read_config_file", "read_overrides_file"]
