"""Exit status of the trainer (cluster/pretrain.sh requeues on PREEMPTED). Kept free of heavy
imports so that a bad config is reported before torch loads."""
OK = 0
FAILED = 1
BAD_CONFIG = 2
NONFINITE = 3          # stopped after repeated non-finite losses; last good state saved
PREEMPTED = 75         # EX_TEMPFAIL: checkpoint saved on a signal; run the same command again
