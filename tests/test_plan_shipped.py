"""Every plan in plans/ validates, dumps to YAML that the schema accepts, and re-resolves
to an equal Plan; the shipped schema is a valid draft 2020-12 schema."""
import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from planc.plan import dump_plan, load_plan, plan_to_data, schema

ROOT = Path(__file__).resolve().parents[1]
PLANS = sorted((ROOT / "plans").rglob("*.yaml"))


def test_plans_are_shipped():
    names = {p.relative_to(ROOT / "plans").as_posix() for p in PLANS}
    for method in ("sapp", "acdc", "magnitude", "powerprop"):
        assert f"digits-{method}.yaml" in names
        assert f"paper/imagenet-resnet50-{method}.yaml" in names
        assert f"paper/criteo-{method}.yaml" in names
    assert "digits-tiny.yaml" in names


def test_schema_is_valid_and_packaged():
    s = schema()
    jsonschema.Draft202012Validator.check_schema(s)
    assert s["$schema"].endswith("2020-12/schema")
    from importlib import resources

    from planc.plan.schema import with_methods
    shipped = json.loads(resources.files("planc").joinpath("schema/plan-v1.json").read_text())
    assert with_methods(shipped) == s            # the file, with its method section from the registry


@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_plan_validates_and_round_trips(path):
    plan = load_plan(path)
    assert plan.schedule.total_steps == plan.train.steps
    text = dump_plan(plan)
    jsonschema.validate(yaml.safe_load(text), schema())
    again = load_plan(text)
    assert again == plan
    assert plan_to_data(again) == plan_to_data(plan)


def test_digits_sapp_is_the_design_example():
    plan = load_plan(ROOT / "plans" / "digits-sapp.yaml")
    assert plan.model.factory.path == "planc.examples.digits:mlp"
    assert plan.model.example_inputs == ((64, 64),)
    assert plan.train.data.path == "planc.examples.digits:loaders" and plan.train.steps == 3000
    assert plan.output == "runs/digits-sapp"
    # 512x64 with 16x16 blocks: 128 blocks, 512x512: 1024 -- both above min_blocks
    assert plan.targets.defaults.min_blocks <= 128
