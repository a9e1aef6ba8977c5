"""docs/integrations.md's LLaVA-1.5 ZeRO-3 recipe runs as written (tiny LLaVA, 2 CPU processes).

The script block is executed under ``torchrun --nproc_per_node 2`` with LLaVA's ``zero3.json``
from the same section, a local tiny LLaVA folder in place of the hub id and a few PNG files as
the user's data. What a CPU machine needs and a GPU one does not comes before it: the gloo
process group (accelerate picks no backend for DeepSpeed without GPUs) handed to
TrainingArguments before it fills the config's "auto" batch sizes, DeepSpeed's CPU
accelerator without its C++ shared-memory op, and transformers' bf16 check, which accepts
bf16 only on a GPU or with ``use_cpu`` (which excludes DeepSpeed).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("deepspeed")

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
DOC = TESTS.parent / "docs" / "integrations.md"
SECTION = "## LLaVA-1.5 under DeepSpeed ZeRO-3"
HUB_LINE = 'path = "llava-hf/llava-1.5-7b-hf"'
STEPS = 16  # one estimate at the default K = 16

CPU_PRELUDE = """
import json, os, sys
import torch
torch.set_num_threads(1)
import deepspeed.comm.torch
from accelerate import PartialState
import transformers.training_args as targs
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
PartialState(backend="gloo")
targs.is_torch_bf16_gpu_available = lambda: True


_post_init = targs.TrainingArguments.__post_init__


def _cpu_post_init(self):
    self.accelerator_config = {"use_configured_state": True}
    self.distributed_state = PartialState()  # world size of the "auto" batch sizes
    _post_init(self)


targs.TrainingArguments.__post_init__ = _cpu_post_init
my_data = json.loads(os.environ["RECIPE_DATA"])
"""

RESULT = """
import torch.distributed as dist
if dist.get_rank() == 0:
    out = {"history": callback.history, "step": trainer.state.global_step,
           "zero3": callback._zero3,
           "lrs": {c.name: c.lr for c in components}}
    open(os.environ["RECIPE_OUT"], "w").write(json.dumps(out, default=str))
dist.barrier()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)  # a DeepSpeed thread alive at interpreter shutdown can abort the exit
"""


def recipe_blocks() -> tuple[str, str]:
    """(zero3.json, train.py) of the section, as a user copies them."""
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index(SECTION) :]
    config = re.search(r"```json\n(.*?)```", section, re.S).group(1)
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return config, code


def test_zero3_recipe_runs_as_written(tmp_path):
    from PIL import Image

    from test_hf_docs import tiny_llava_folder

    config, code = recipe_blocks()
    assert HUB_LINE in code and 'deepspeed="zero3.json"' in code
    assert json.loads(config)["zero_optimization"]["stage"] == 3
    (tmp_path / "zero3.json").write_text(config)
    folder = tiny_llava_folder(tmp_path / "tiny-llava")
    code = code.replace(HUB_LINE, f"path = {str(folder)!r}")
    files = []
    for colour, name in (((220, 30, 30), "red"), ((30, 30, 220), "blue")):
        Image.new("RGB", (40, 40), colour).save(tmp_path / f"{name}.png")
        files.append((str(tmp_path / f"{name}.png"), "What colour is the shape?", name))
    rows = files * (STEPS * 16)  # 16 rows per process and step, 2 processes
    script = tmp_path / "train.py"
    script.write_text(CPU_PRELUDE + code + RESULT)
    out = tmp_path / "result.json"
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "RECIPE_DATA": json.dumps(rows),
        "RECIPE_OUT": str(out),
        "PYTHONPATH": os.pathsep.join(
            [str(TESTS.parent / "src"), os.environ.get("PYTHONPATH", "")]
        ),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*cmd, str(script)], capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path
    )
    assert out.exists(), done.stderr[-4000:]
    got = json.loads(out.read_text())
    assert got["zero3"] is True and got["step"] == STEPS == len(got["history"])
    assert got["lrs"] == {"encoder": 2e-5, "llm": 2e-4}
    estimates = [h for h in got["history"] if "commit/D/encoder" in h]
    assert [h["commit/estimate_step"] for h in estimates] == [STEPS]
    last = estimates[-1]
    assert last["commit/D/encoder"] > 0 and last["commit/D/llm"] > 0
    assert math.isfinite(last["commit/kappa"])
    assert last["commit/tokens"] > 0
    assert done.stderr.count("CoMMIT under ZeRO-3: theta_t kept") == 2
