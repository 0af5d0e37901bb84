"""Checkpoints: the one reader and writer of checkpoint directories.

    directory.py    what a checkpoint directory holds: tags, the COMPLETE manifest, checks,
                    `latest`, pruning, setting broken or superseded checkpoints aside
    save.py         the collective save protocol (COMPLETE only when every rank wrote its part)
    resume.py       resuming: the newest checkpoint every rank can load, else an older one
    rank_state.py   per-rank RNG and data-loader state (weights-only loadable)
    fp32.py         the fp32 weights of DeepSpeed's files, any ZeRO stage and TP degree
    universal.py    resuming on another number of data-parallel ranks (DeepSpeed universal)
    model_files.py  initialising a model from a file or directory (checkpoint.init_from)
    convert_tp.py   beit3-convert-tp: change the tensor-parallel degree of files
Durable writes and weights-only loads of files from outside the run are
megatron_style/files.py (below every package: the tokenizers use it too).

What is guaranteed, and what is not, is in the README ("Checkpoints and resuming").
"""
