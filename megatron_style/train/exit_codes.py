"""Exit status of the trainer. Every rank of a run ends with the same status (the ranks agree
on it), so a launcher that reports the highest task status reports the run's. Kept free of
heavy imports so that a bad config is reported before torch loads.

cluster/pretrain.sh requeues on PREEMPTED only; everything else ends the job.
"""
OK = 0
FAILED = 1             # an error on some rank (traceback and the failing rank in the log)
BAD_CONFIG = 2         # ConfigError: a bad value or a missing file, found before training
NONFINITE = 3          # stopped after repeated non-finite losses; last good state saved
STOPPED = 4            # stopped on a signal without writing a checkpoint (checkpoint.save=false)
PREEMPTED = 75         # EX_TEMPFAIL: checkpoint written on a signal; run the same command again
STALLED = 124          # the step watchdog fired (guards.stall_timeout_s): stacks in the log
