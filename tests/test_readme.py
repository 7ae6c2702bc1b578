"""The README's examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _first_python_block(heading: str) -> str:
    section = README.read_text().split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_model_example_runs():
    exec(compile(_first_python_block("## A model using the interfaces"), "README.md", "exec"), {})


def test_hf_example_runs_and_prints_the_report_shown(capsys):
    from pyiface.integrations.transformers import revert_kernels
    from tests.pyiface.integrations.hf_models import ops_seen

    try:
        with ops_seen() as seen:
            exec(compile(_first_python_block("## Use with HF transformers and peft"), "README.md", "exec"), {})
    finally:
        revert_kernels()
    assert {"ifk::selective_scan", "ifk::selective_state_update", "ifk::add_lora_linear"} <= seen, seen
    section = README.read_text().split("## Use with HF transformers and peft", 1)[1]
    shown = re.search(r"shows the report.*?```\n(.*?)```", section, re.S).group(1)
    assert capsys.readouterr().out == shown
