"""Package-level checks: the README example runs, the core imports only torch, the API is public."""

import inspect
import re
import subprocess
import sys
from pathlib import Path

import commit_mllm

ROOT = Path(__file__).resolve().parents[1]


def test_readme_pytorch_example_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    out = subprocess.run(
        [sys.executable, "-c", blocks[0]], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "kappa=" in out.stdout and "state=" in out.stdout
    assert "encoder" in out.stdout and "total" in out.stdout  # the component table


def test_core_imports_only_torch():
    code = (
        "import sys, commit_mllm\n"
        "heavy = ('transformers', 'peft', 'accelerate', 'datasets', 'yaml')\n"
        "bad = [m for m in heavy if m in sys.modules]\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_public_api_is_exported_and_documented():
    for name in commit_mllm.__all__:
        obj = getattr(commit_mllm, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert obj.__doc__, f"{name} has no docstring"


def test_readme_yaml_example_validates(tmp_path):
    from commit_mllm.training.config import load_config

    text = (ROOT / "README.md").read_text()
    (block,) = re.findall(r"```yaml\n(.*?)```", text, re.S)
    path = tmp_path / "my_run.yaml"
    path.write_text(block)
    cfg = load_config(path)
    assert cfg.model.mllm.llm.lora.r == 64 and cfg.commit.strategy == "progress"
