"""`vtprune eval` end to end: lmms-eval 0.7.3 on the shipped toy LLaVA, unpruned and pruned.

The accuracy lmms-eval reports must equal vtprune.toyvqa.scoring on the same
items with the same checkpoint and policy, loaded independently (toyvqa.load,
not lmms-eval's wrapper); a failed evaluation must exit non-zero.
"""

from __future__ import annotations

import json
import os

import pytest

import vtprune
from vtprune import toyvqa
from vtprune.cli import main

if not os.environ.get("CI"):  # in CI (the README's test command installs it) a missing lmms-eval fails below
    pytest.importorskip("lmms_eval")

N = 20
CHECKPOINT = toyvqa.checkpoint_path("llava")
pytestmark = pytest.mark.skipif(not (CHECKPOINT / "config.json").exists(), reason="no shipped toy model")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("vtprune-cache")


def _eval(model_args: str, out, cache, *extra: str) -> int:
    return main(
        [
            "eval",
            "--model_args",
            model_args,
            "--tasks",
            "toyvqa",
            "--limit",
            str(N),
            "--device",
            "cpu",
            "--output_path",
            str(out),
            "--cache_dir",
            str(cache),
            "--offline",
            *extra,
        ]
    )


@pytest.mark.parametrize("flag", [False, True], ids=["environment-as-is", "offline"])
def test_network_settings_are_the_users_unless_offline_is_asked(flag, tmp_path, monkeypatch):
    """A networked GPU box must be able to download checkpoints and task data: offline only on request."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the user's own setting (no network here) is kept either way
    for name in ("HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    args = ["eval", "--model_args", f"pretrained={tmp_path / 'nothing'}", "--tasks", "toyvqa"]
    assert main(args + (["--offline"] if flag else [])) == 1  # no checkpoint there: fails before any evaluation
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    for name in ("HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        assert os.environ.get(name) == ("1" if flag else None), name


@pytest.mark.parametrize("policy", [None, ("idpruner", 64)], ids=["unpruned", "idpruner-64"])
def test_accuracy_equals_toyvqa_scoring(policy, tmp_path, cache):
    model_args = f"pretrained={CHECKPOINT}" + (f",policy={policy[0]},keep={policy[1]}" if policy else "")
    assert _eval(model_args, tmp_path, cache) == 0

    results = json.loads((tmp_path / "results.json").read_text())
    metrics = results["results"]["toyvqa"]
    assert results["n-samples"]["toyvqa"]["effective"] == N
    summary = json.loads((tmp_path / "vtprune_report.json").read_text())["summary"]
    assert summary == results["vtprune"] and summary["prefills"] == N
    if policy:
        assert summary["visual_tokens_before"] == 576 and summary["visual_tokens_after"] == policy[1]
        assert summary["stages"]["projector"]["after"] == policy[1]
    else:
        assert summary["policy"] == "none" and "visual_tokens_after" not in summary

    model, processor = toyvqa.load("llava")
    if policy:
        vtprune.wrap(model, policy[0], keep=policy[1], tokenizer=processor)
    expected = toyvqa.score(model, processor, n=N, return_predictions=True)
    assert metrics["accuracy,none"] == pytest.approx(expected["overall"])
    for kind, value in expected["per_type"].items():
        assert metrics[f"{kind},none"] == pytest.approx(value), kind
    samples = [json.loads(line) for line in (tmp_path / "samples_toyvqa.jsonl").read_text().splitlines()]
    answers = {s["doc"]["id"]: toyvqa.scoring.first_word(s["filtered_resps"][0]) for s in samples}
    assert answers == {p["id"]: p["prediction"] for p in expected["predictions"]}


def test_failed_generation_exits_nonzero(tmp_path, cache, monkeypatch, capsys):
    """lmms-eval logs a failed generate() and scores an empty answer; the runner must fail instead."""
    from transformers import LlavaForConditionalGeneration

    def broken(self, *args, **kwargs):
        raise RuntimeError("generate exploded")

    monkeypatch.setattr(LlavaForConditionalGeneration, "generate", broken)
    assert _eval(f"pretrained={CHECKPOINT},policy=pooling,keep=32", tmp_path, cache) == 1
    assert "generate exploded" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_bad_arguments_exit_nonzero_before_loading(tmp_path, cache, capsys):
    assert _eval(f"pretrained={CHECKPOINT},keep=64", tmp_path, cache) == 1  # a budget without a policy
    assert "need a policy" in capsys.readouterr().err
    assert _eval(f"pretrained={CHECKPOINT},policy=idpruner,keep=9.0", tmp_path, cache) == 1
    assert "(0, 1]" in capsys.readouterr().err
    assert _eval(f"pretrained={tmp_path / 'nothing'}", tmp_path, cache) == 1
    assert "FAILED" in capsys.readouterr().err


@pytest.mark.parametrize(
    "results, message",
    [
        (None, "no results"),
        ({"results": {}, "n-samples": {}}, "missing"),
        ({"results": {"t": {"acc,none": 1.0}}, "n-samples": {"t": {"effective": 0}}}, "no samples"),
        ({"results": {"t": {"acc,none": float("nan"), "acc_stderr,none": 0.1}}, "n-samples": {"t": {"effective": 3}}}, "finite"),
    ],
)
def test_results_that_are_not_a_success_are_refused(results, message):
    from vtprune.eval.lmms import EvalFailed, _check

    with pytest.raises(EvalFailed, match=message):
        _check(results, ["t"], errors=[])
    with pytest.raises(EvalFailed, match="logged 1 error"):
        _check({"results": {"t": {"acc,none": 1.0}}, "n-samples": {"t": {"effective": 1}}}, ["t"], errors=["Error in generating"])


def test_sweep_runs_lmms_tasks_beside_the_offline_scorer(tmp_path, cache):
    import yaml

    from vtprune.eval.sweep import main as sweep

    cfg = {
        "out": str(tmp_path / "out"),
        "models": ["llava"],
        "budgets": [32],
        "n": 5,
        "cache_dir": str(cache),
        "tasks": ["toyvqa", "lmms:toyvqa"],
        "offline": True,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert sweep([str(path)]) == 0
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [(r["task"], r["policy"]) for r in rows] == [(t, p) for t in cfg["tasks"] for p in ("none", "random", "pooling")]
    direct, via_lmms = rows[:3], rows[3:]
    for a, b in zip(direct, via_lmms):  # the same items and model: the same accuracy and kept tokens either way
        assert a["accuracy"] == pytest.approx(b["accuracy"]) and a["kept_tokens"] == b["kept_tokens"]
    assert via_lmms[0]["metric"] == "accuracy" and set(via_lmms[0]["metrics"]) >= {"accuracy", "color", "reading"}
    assert all(set(r["prefill_ms"]) == {"1"} and r["batch_size"] == 1 for r in via_lmms)  # lmms-eval's llava: batch 1
    assert all(a["retained_per_type"] == pytest.approx(b["retained_per_type"]) for a, b in zip(direct[1:], via_lmms[1:]))
    assert all(0.0 <= r["agreement"] <= 1.0 for r in via_lmms[1:])
    assert (tmp_path / "out" / "lmms" / "llava" / "toyvqa" / "pooling-32" / "vtprune_report.json").is_file()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**cfg, "tasks": ["mme"]}))
    with pytest.raises(ValueError, match="lmms:NAME"):
        sweep([str(bad)])


# ---- issue 18 item 11: nothing planted in the task cache is run, tampered items are exported again


def _export_folder(cache, n):
    from vtprune.toyvqa.models import IMAGE_SIZE

    return cache / "toyvqa" / f"test-n{n}-{IMAGE_SIZE['llava']}px"


def test_code_planted_in_the_task_cache_is_never_imported(tmp_path, monkeypatch, capsys):
    """A YAML plus a .py dropped into the shared export folder must not run when `vtprune eval` evaluates toyvqa."""
    from types import SimpleNamespace

    from lmms_eval import evaluator
    from lmms_eval.tasks import get_task_dict

    from vtprune.eval import lmms

    cache = tmp_path / "cache"
    assert main(["eval", "--print-include-path", "toyvqa", "--limit", "4", "--cache_dir", str(cache)]) == 0
    capsys.readouterr()
    folder = _export_folder(cache, 4)
    assert (folder / "test.jsonl").is_file()
    marker = tmp_path / "planted-code-ran"
    for where in (folder, folder / "images"):  # beside the items, and one folder down (indexed last)
        (where / "evil.py").write_text(
            f"open({str(marker)!r}, 'w').close()\ndef doc_to_text(doc, kwargs=None):\n    return 'planted'\n"
        )
        (where / "evil.yaml").write_text(
            f"include: {folder / 'toyvqa.yaml'}\ntask: toyvqa\n"  # the task, one hook changed
            "doc_to_text: !function evil.doc_to_text\n"
        )
    seen = {}

    def evaluate(*, tasks, task_manager, **kwargs):  # lmms-eval's evaluator up to the point it reads the task
        task = get_task_dict(tasks, task_manager)["toyvqa"]
        docs = list(task.test_docs())
        seen["texts"] = [task.doc_to_text(d) for d in docs]
        seen["prompts"] = [d["prompt"] for d in docs]
        return {"results": {"toyvqa": {"accuracy,none": 1.0}}, "n-samples": {"toyvqa": {"effective": len(docs)}}}

    monkeypatch.setattr(evaluator, "simple_evaluate", evaluate)
    lm = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(model_type="llava")), batch_size=1)
    log = SimpleNamespace(gathered=lambda: [], summary=lambda records: {})
    lmms.run(lm, log, ["toyvqa"], limit=4, cache_dir=cache)
    assert not marker.exists()
    from vtprune.toyvqa.questions import make_item

    expected = [make_item("test", i, size=336)[0].question for i in range(4)]  # the items, from their generator
    assert seen["texts"] == seen["prompts"] == expected
    assert not list(folder.rglob("evil*"))  # the folder was exported again


def test_edited_or_extra_files_in_the_export_are_replaced_by_a_fresh_export(tmp_path):
    from vtprune.eval.tasks import prepare_toyvqa
    from vtprune.toyvqa.export import export

    def contents(folder):  # the items: what lmms-eval reads
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in [folder / "test.jsonl", *(folder / "images").iterdir()]}

    fresh = tmp_path / "fresh"
    export(fresh, n=3, size=336)  # the truth: an export of its own
    truth = contents(fresh)
    assert set(truth) == {"test.jsonl", "images/test-0.png", "images/test-1.png", "images/test-2.png"}

    cache = tmp_path / "cache"
    folder = prepare_toyvqa(n=3, image_size=336, cache_dir=cache)
    assert contents(folder) == truth
    stamp = (folder / "test.jsonl").stat().st_mtime_ns
    assert prepare_toyvqa(n=3, image_size=336, cache_dir=cache) == folder
    assert (folder / "test.jsonl").stat().st_mtime_ns == stamp  # verified, so reused, not exported again

    first, *rest = (folder / "test.jsonl").read_text().splitlines(keepends=True)
    row = json.loads(first)
    tampered = [
        lambda: (folder / "test.jsonl").write_text(json.dumps({**row, "answer": "planted"}) + "\n" + "".join(rest)),
        lambda: (folder / "images" / "test-1.png").write_bytes(truth["images/test-2.png"]),
        lambda: (folder / "notes.yaml").write_text("task: x\n"),
        lambda: (folder / "images" / "test-2.png").unlink(),
        lambda: (folder / "hf_datasets").mkdir(),
    ]
    for tamper in tampered:
        tamper()
        assert prepare_toyvqa(n=3, image_size=336, cache_dir=cache) == folder
        assert contents(folder) == truth
        assert {p.name for p in folder.iterdir()} <= {"test.jsonl", "images", "manifest.json"}
    assert [p.name for p in (cache / "toyvqa").iterdir()] == [folder.name]  # no staging folder left behind
