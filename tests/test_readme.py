"""The README's examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _first_python_block(heading: str) -> str:
    section = README.read_text().split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_model_example_runs():
    exec(compile(_first_python_block("## A model using the interfaces"), "README.md", "exec"), {})


def test_hf_example_runs():
    from pyiface.integrations.transformers import revert_kernels

    try:
        exec(compile(_first_python_block("## Use with HF transformers and peft"), "README.md", "exec"), {})
    finally:
        revert_kernels()
