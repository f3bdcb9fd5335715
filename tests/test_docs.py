"""The README is checked against the code, so it cannot drift: every setting with its default, the
two commands, and CI calling the README's test command."""

from pathlib import Path

from imgdedup.config import describe
from imgdedup.metrics import STAGES

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_configuration_table_matches_the_code():
    for var, default, text in describe():
        assert f"| `{var}` | `{default}` | {text} |" in README, f"{var}: regenerate with `imgdedup config --table`"


def test_readme_names_the_two_commands_and_ci_runs_the_test_one():
    assert "make test" in README and "make run" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_every_schema_is_documented():
    for schema in (ROOT / "schemas").glob("*.json"):
        assert f"`{schema.stem}`" in README, schema.name


def test_every_stage_is_documented():
    assert all(stage in README for stage in STAGES)


def test_every_metric_is_documented():
    from prometheus_client import REGISTRY

    for metric in REGISTRY.collect():
        if metric.name.startswith("imgdedup_"):
            name = metric.name + ("_total" if metric.type == "counter" else "")
            assert f"`{name}`" in README, name
