"""Plans: the YAML language (load, validate, resolve, dump) and its JSON Schema.

    from planc.plan import load_plan, dump_plan, schema
"""
from planc.plan.dump import dump_plan, plan_to_data  # noqa: F401
from planc.plan.load import load_plan  # noqa: F401
from planc.plan.schema import schema  # noqa: F401
from planc.plan.types import Plan  # noqa: F401
