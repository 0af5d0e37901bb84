"""Every console script: thin argparse over the library, the top layer (nothing imports cli/).

    beit3-pretrain         megatron_style.train.pretrain (also `python -m` it: the launchers'
                           entry point, kept beside the run it starts)
    beit3-evaluate         evaluate.py       caption-word gap of a demo checkpoint
    beit3-export           export.py         a checkpoint as one fp32 model file (ours / released)
    beit3-convert-tp       convert_tp.py     change the tensor-parallel degree of model files
    beit3-summary          summary.py        parameters and FLOPs of a preset
    beit3-memory-plan      memory_plan.py    per-GPU memory before a launch
    beit3-make-shards      make_shards.py    webdataset shards from local files
    beit3-train-tokenizer  train_tokenizer.py  SentencePiece / k-means tokenizers
    beit3-plot             plot.py           curves from metrics.jsonl
    beit3-run-summary      run_summary.py    steady-state medians of runs
    beit3-kernel-check     kernel_check.py   the Triton kernels against their references, here
    (no script)            overrides_file.py  OVERRIDES_FILE for cluster/*.sh
"""
