"""lm-eval-harness bridge on the offline bundled task; skipped when lm_eval is not installed."""

from __future__ import annotations

from pathlib import Path

import pytest

import moeprune
from moeprune.evaluation.lm_eval_bridge import LOCAL_TASK, local_task_dir

ASSET = Path(moeprune.__file__).parent / "assets" / "tiny-moe"


def test_local_task_yaml_points_to_absolute_data(tmp_path) -> None:
    folder = local_task_dir(workdir=tmp_path)
    text = (folder / f"{LOCAL_TASK}.yaml").read_text()
    assert "__DATA_FILE__" not in text
    data_line = next(line for line in text.splitlines() if line.strip().startswith("test:"))
    assert Path(data_line.split(":", 1)[1].strip()).is_absolute()
    with pytest.raises(FileNotFoundError):
        local_task_dir(tmp_path / "missing.jsonl", workdir=tmp_path)


@pytest.mark.slow
@pytest.mark.skipif(not (ASSET / "model.safetensors").is_file(), reason="bundled model not trained yet")
def test_run_offline_task_with_in_memory_model() -> None:
    pytest.importorskip("lm_eval")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeprune.evaluation.lm_eval_bridge import run_lm_eval

    model = AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(ASSET)
    results = run_lm_eval(model, tok, limit=10, batch_size=4)
    acc = results[LOCAL_TASK]["acc,none"]
    assert 0.0 <= acc <= 1.0
