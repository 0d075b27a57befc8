"""lm-eval 0.4 (`local-completions`) scores a multiple-choice task through the server exactly as
it scores it through transformers (lm-eval's own `hf` model) on the same weights: per-choice
loglikelihoods within fp32 noise, the same predictions, the same accuracy. The task is local (a
JSONL file and a YAML); both prepend BOS (lm-eval's `hf` does by the tokenizer's default,
`local-completions` only when told). The answers spread over every position: a server whose echoed logprobs
missed the prompt scored at the "always choice 0" rate."""

from __future__ import annotations

import json
import os

import pytest

from tests.e2e.conftest import Server

WORDS = ["river", "stone", "light", "bread", "cloud", "engine", "garden", "window", "silver",
         "thunder", "paper", "orange", "forest", "candle", "winter", "harbor"]  # fmt: skip
TASK = """task: tokenmill_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm_eval_task")
    docs = []
    for i in range(16):
        choices = [WORDS[(i + k * 5) % len(WORDS)] for k in range(4)]
        docs.append({"question": f"which word goes with {WORDS[(i * 7) % 16]} and "
                     f"{WORDS[(i * 3 + 1) % 16]}?", "choices": choices, "label": i % 4})  # fmt: skip
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "tokenmill_mc.yaml").write_text(TASK.format(data=data))
    return folder


def evaluate(model: str, model_args: dict, task_dir):
    import lm_eval
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["tokenmill_mc"],
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True,
        batch_size=1,
    )
    samples = sorted(out["samples"]["tokenmill_mc"], key=lambda s: s["doc_id"])
    logliks = [[r[0][0] for r in s["resps"]] for s in samples]
    return out["results"]["tokenmill_mc"]["acc,none"], logliks


def test_local_completions_scores_as_transformers_does(tiny_model_dir, task_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", "none")
    folder = str(tiny_model_dir("llama"))
    server = Server(folder, "--max-model-len", "256")
    try:
        served_acc, served = evaluate(
            "local-completions",
            {"model": "tiny", "base_url": f"{server.url}/v1/completions", "tokenizer": folder,
             "tokenizer_backend": "huggingface", "num_concurrent": 1, "max_retries": 1,
             "add_bos_token": True},
            task_dir,
        )  # fmt: skip
    finally:
        assert server.stop() == 0
    ref_acc, ref = evaluate(
        "hf",
        {"pretrained": folder, "dtype": "float32", "device": "cpu", "add_bos_token": True},
        task_dir,
    )
    assert len(served) == len(ref) == 16
    for s, r in zip(served, ref):
        assert s == pytest.approx(r, abs=2e-3, rel=1e-4)
    picks = [max(range(4), key=lambda k, row=row: row[k]) for row in served]
    assert picks == [max(range(4), key=lambda k, row=row: row[k]) for row in ref]
    assert len(set(picks)) > 1  # not one position every time
    assert served_acc == ref_acc
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"
