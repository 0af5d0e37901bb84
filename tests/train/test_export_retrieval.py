"""An ITC-tuned run exported for retrieval: `beit3-export --layout retrieval` writes unilm
BEiT3ForRetrieval's keys exactly (beit3.*, vision_head.weight, language_head.weight, a 0-d
logit_scale; no MDM heads), with the trained values; `--layout released` keeps the MDM heads
beside them; and the file reads back (init_from) into a model with ITC heads, every tensor
equal."""
import pytest
import torch

from megatron_style.checkpoint.fp32 import consolidated_state_dict
from megatron_style.checkpoint.model_files import load_model_file
from megatron_style.cli.export import main as export_main
from megatron_style.config import model_config
from megatron_style.model import MaskedDataModel
from megatron_style.model.contrastive import ContrastiveModel
from megatron_style.model.released_checkpoint import export_retrieval_state_dict
from tests.train.launch import TINY, explain, pretrain, run_dirs

pytestmark = pytest.mark.multiproc

DECOUPLED = ["model.attention=decoupled", "model.vl_layers=0", "model.kernels=reference"]


def test_itc_run_exports_the_retrieval_layout_and_reads_back(tmp_path):
    p = pretrain([*TINY, *DECOUPLED, *run_dirs(tmp_path), "steps=2", "objective.itc=1",
                  "data.micro_batch_size=9"])
    assert p.returncode == 0, explain(p)
    ckpt = str(tmp_path / "run" / "ckpt")
    trained, _ = consolidated_state_dict(ckpt)

    out = tmp_path / "beit3_tiny_itc.pth"
    assert export_main([ckpt, "--layout", "retrieval", "--out", str(out)]) == 0
    sd = torch.load(out, weights_only=True)["model"]
    cfg = model_config("tiny", attention="decoupled", vl_layers=0, kernels="reference")
    assert set(sd) == set(export_retrieval_state_dict(ContrastiveModel(cfg)))
    assert {"vision_head.weight", "language_head.weight", "logit_scale"} <= set(sd)
    assert not any(k.startswith(("mlm_head", "mim_head")) for k in sd)
    assert sd["logit_scale"].shape == ()   # unilm's 0-d parameter
    assert torch.equal(sd["vision_head.weight"], trained["itc.vision_head.weight"])
    assert float(sd["logit_scale"]) == float(trained["itc.logit_scale"])
    assert float(trained["itc.logit_scale"]) != pytest.approx(2.6592600, abs=1e-7)  # it trained

    # read back into the dual encoder: nothing missing, every tensor the run's
    model = ContrastiveModel(cfg)
    load_model_file(model, str(out))
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k

    released = tmp_path / "beit3_tiny_released.pth"
    assert export_main([ckpt, "--layout", "released", "--out", str(released)]) == 0
    rel = torch.load(released, weights_only=True)["model"]
    assert set(sd) < set(rel) and any(k.startswith("mlm_head.") for k in rel)
    back = MaskedDataModel(cfg, heads=("itc",))
    load_model_file(back, str(released))
    for k, v in back.state_dict().items():
        assert torch.equal(v, trained[k]), k


def test_retrieval_layout_needs_the_itc_heads(tmp_path, capsys):
    p = pretrain([*TINY, *DECOUPLED, *run_dirs(tmp_path), "steps=1"])
    assert p.returncode == 0, explain(p)
    code = export_main([str(tmp_path / "run" / "ckpt"), "--layout", "retrieval",
                        "--out", str(tmp_path / "x.pth")])
    assert code == 2
    assert "trained without objective.itc; use --layout released" in capsys.readouterr().err
