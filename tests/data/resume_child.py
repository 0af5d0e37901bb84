"""Run by test_stream_resume.py in a fresh process: restore a loader state, take batches.

    python resume_child.py SPEC.json   (spec: cfg keyword arguments, state file, batches, out)
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron_style.data.loader import build_train_loader  # noqa: E402
from streaming_helpers import StandInProcessor, batch_record, make_cfg  # noqa: E402


def main(spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    cfg = make_cfg(**spec["cfg"])
    loader = build_train_loader(cfg, spec["rank"], spec["world"], StandInProcessor(cfg))
    with open(spec["state"]) as f:
        loader.load_state_dict(json.load(f))
    it = iter(loader)
    records = [batch_record(next(it)) for _ in range(spec["batches"])]
    with open(spec["out"], "w") as f:
        json.dump({"records": records, "bad": loader.bad_sample_counts(),
                   "state": loader.state_dict()}, f)


if __name__ == "__main__":
    main(sys.argv[1])
