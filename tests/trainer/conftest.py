import json
import os
import sys

import pytest

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)  # coin_verifier for "module:function" verifiers


@pytest.fixture
def coin_dataset(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"Say something {i}", "answer": i}) for i in range(6)) + "\n")
    return str(path)


def tiny_config(tmp_path, **over):
    from srpo import TrainConfig

    cfg = dict(model="tiny", steps=2, prompts_per_step=2, group_size=4, max_new_tokens=6, output_dir=str(tmp_path),
               progress=False, eval_prompts=2, lr=1e-3)
    cfg.update(over)
    return TrainConfig(**cfg)
