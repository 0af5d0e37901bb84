"""The objective, stage and eval sections: what a run may combine, refused before any process
starts with the key to change; and which optional heads a run's model holds."""
import pytest

from megatron_style.config import ConfigError, load_config
from megatron_style.config.objective import model_heads

DEMO = "configs/pretrain/demo.yaml"


@pytest.mark.parametrize("overrides, message", [
    (["objective.mdm=0"], "objective: every objective weight is 0"),
    (["objective.itc=1", "data.pair.weight=0"], "objective.itc: itc learns from image-text pairs"),
    (["objective.itm=1"], "objective.itm: itm draws its hard negatives from the ITC"),
    (["objective.itc=1", "objective.itm=1", "model.attention=decoupled", "model.vl_layers=0"],
     "objective.itm: itm runs on the fusion path"),
    (["objective.itc=-1"], "objective.itc: must be a finite number >= 0"),
    (["stages=[{steps: 3000, train: [brains]}]"], "stages[0].train: unknown parameter unit 'brains'"),
    (["stages=[{steps: 1000}, {steps: 1000}]"], "stages: the stages' steps add up to 2000 but the run has steps=3000"),
    (["stages=[{steps: 3000, streams: {video: 1}}]"], "stages[0].streams.video: unknown stream"),
    (["stages=[{steps: 3000, streams: {image: 0, text: 0, pair: 0}}]"], "at least one of image/text/pair"),
    (["stages=[{steps: 3000, streams: {pair: 0}, objective: {itc: 1}}]"],
     "stages[0].objective.itc: itc learns from image-text pairs"),
    (["stages=[{steps: 3000, warmup_steps: 10}]"], "stages[0].warmup_steps: belongs to the stage's own schedule"),
    (["stages=[{steps: 0}]"], "stages[0].steps: must be >= 1"),
    (["eval.every_steps=-1"], "eval.every_steps: must be"),
])
def test_bad_combinations_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(DEMO, overrides)
    assert message in str(e.value)


def test_heads_follow_every_stage_objective():
    assert model_heads(load_config(DEMO)) == ()
    assert model_heads(load_config(DEMO, ["objective.itc=1"])) == ("itc",)
    staged = load_config(DEMO, ["stages=[{steps: 1000}, {steps: 2000, objective: {mdm: 1, itc: 1, itm: 1}}]"])
    assert model_heads(staged) == ("itc", "itm")


@pytest.mark.parametrize("recipe", ["demo_vlmo", "vlmo_base", "itc_tune_base"])
def test_the_objective_recipes_load(recipe):
    cfg = load_config(f"configs/pretrain/{recipe}.yaml")
    assert cfg.objective.itc > 0 or any(s.objective and s.objective.itc > 0 for s in cfg.stages)


def test_validation_on_shards_needs_eval_shards_that_exist(tmp_path):
    from megatron_style.train.preflight import check_eval_paths
    base = "configs/pretrain/base.yaml"
    check_eval_paths(load_config(base))                      # no validation asked: nothing to check
    with pytest.raises(ConfigError, match="eval.every_steps: validation on data.source shards"):
        check_eval_paths(load_config(base, ["eval.every_steps=100"]))
    with pytest.raises(ConfigError, match="eval.pair_shards"):
        check_eval_paths(load_config(base, ["eval.every_steps=100",
                                            f"eval.pair_shards={tmp_path}/val/{{000..002}}.tar"]))
    (tmp_path / "val").mkdir()
    for i in range(3):
        (tmp_path / "val" / f"{i:03d}.tar").write_bytes(b"")
    check_eval_paths(load_config(base, ["eval.every_steps=100",
                                        f"eval.pair_shards={tmp_path}/val/{{000..002}}.tar"]))
