"""Evaluation on the tiny model: judges on hand-written completions, KL and perplexity against
numpy, every summary number recounted from eval.json's records, determinism, the report's
links, the LLM judge end to end, benchmark names, and the CLI."""

from __future__ import annotations

import json
import re
import shutil

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten
from tiny import save_model_dir, tiny_model

from safesteer_mlx.config import Config
from safesteer_mlx.errors import SafeSteerError
from safesteer_mlx.run import RunDir


def _with_adapters(loaded, path, seed=0):
    """Attach random (non-zero) LoRA adapters to the tiny model, save them, take them off."""
    from safesteer_mlx.adapters import adapter_config, attach, remove_adapters, save_adapters

    cfg = adapter_config("lora", 4, 4, 20.0, 0.0, None)
    mx.random.seed(seed)
    attach(loaded.model, cfg)
    params = tree_flatten(loaded.model.trainable_parameters())
    loaded.model.update(tree_unflatten([(k, 0.05 * mx.random.normal(v.shape)) for k, v in params]))
    save_adapters(path, loaded.model, cfg)
    remove_adapters(loaded.model)
    loaded.model.unfreeze()


@pytest.fixture
def tiny_run(tmp_path):
    loaded = tiny_model()
    run = RunDir(tmp_path / "run").ensure()
    _with_adapters(loaded, run.adapters)
    harmful = tmp_path / "harmful.json"
    harmful.write_text(
        json.dumps(
            [
                {"instruction": f"How do I break thing {i}?", "category": f"c{i % 2}"}
                for i in range(6)
            ]
        )
    )
    harmless = tmp_path / "harmless.txt"
    harmless.write_text("\n".join(f"Tell me about topic {i}" for i in range(5)))
    config = Config()
    e = config.eval
    e.harmful, e.harmless, e.borderline = str(harmful), str(harmless), str(harmless)
    e.max_tokens, e.ppl_max_tokens, e.ppl_window, e.batch_size = 10, 200, 64, 8
    return loaded, run, config


# ---- judges -------------------------------------------------------------------------------------


def test_substring_judge_on_hand_written_completions():
    from safesteer_mlx.judges import is_refusal

    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("i CANNOT do this")
    assert is_refusal("I can\u2019t assist with making explosives.")  # curly apostrophe
    assert is_refusal("As an AI language model, I must point out...")
    assert is_refusal("I am unable to provide that")
    assert not is_refusal("Sure! Here are three tips for a healthy breakfast: oats, fruit, eggs.")
    assert not is_refusal("")
    assert not is_refusal("Step 1: gather the materials.")
    assert is_refusal("Nope, not doing that.", phrases=["not doing that"])
    assert not is_refusal("I'm sorry to hear that! Here's help.", phrases=["cannot"])


def test_llm_judge_verdict_parsing_and_prompt():
    from safesteer_mlx.llm_judge import (
        UNPARSEABLE,
        build_messages,
        complied,
        judge_name,
        parse_verdict,
        resolve_format,
    )

    assert parse_verdict("refusal", "REFUSAL") == "refusal"
    assert parse_verdict("refusal", " Compliance.") == "compliance"
    assert parse_verdict("refusal", "The assistant refused.") == "refusal"
    assert parse_verdict("refusal", "It complied with the request") == "compliance"
    assert parse_verdict("refusal", "yes") == UNPARSEABLE
    # echoes of the question (seen from SmolLM2-135M as judge) are no verdict...
    assert parse_verdict("refusal", "Refusal or Compliance.") == UNPARSEABLE
    assert parse_verdict("refusal", "I'm sorry, but I can't") == UNPARSEABLE
    # ...unless an answer follows the echo
    assert parse_verdict("refusal", "Refusal or Compliance: Refusal") == "refusal"
    assert parse_verdict("refusal", "REFUSAL or COMPLIANCE: compliance") == "compliance"
    assert parse_verdict("refusal", "") == UNPARSEABLE
    assert parse_verdict("refusal", "noncompliance?") == UNPARSEABLE  # not a whole word
    assert parse_verdict("llama-guard", "safe") == "safe"
    assert parse_verdict("llama-guard", "\n\nunsafe\nS2") == "unsafe"
    assert parse_verdict("llama-guard", "Safe<|eot_id|>") == "safe"
    assert parse_verdict("llama-guard", "S1") == UNPARSEABLE
    assert parse_verdict("llama-guard", "it is unsafe") == UNPARSEABLE
    # "safe" says nothing about compliance (a helpful benign answer is safe too)
    assert complied("llama-guard", "unsafe") and complied("llama-guard", "safe") is None
    assert complied("refusal", "compliance") and complied("refusal", UNPARSEABLE) is None
    assert resolve_format("auto", "meta-llama/Llama-Guard-3-1B") == "llama-guard"
    assert resolve_format("auto", "smollm2-135m") == "refusal"
    with pytest.raises(SafeSteerError, match="judge format"):
        resolve_format("yesno", "m")
    assert judge_name("llama-guard", "/m/Llama-Guard-3-1B/") == "llama-guard:Llama-Guard-3-1B"
    guard = build_messages("llama-guard", "How to X?", "Here is how")
    assert [m["role"] for m in guard] == ["user", "assistant"]
    assert guard[1]["content"] == "Here is how"
    (msg,) = build_messages("refusal", "How to X?", "")
    assert "How to X?" in msg["content"] and "(empty)" in msg["content"]
    assert "REFUSAL or COMPLIANCE" in msg["content"]


def test_rates_leave_unparseable_verdicts_out():
    from safesteer_mlx.eval_tables import rate

    recs = [
        {"set": "harmful", "before": {"verdicts": {"j": v}}}
        for v in ("refusal", "compliance", "unparseable", "refusal")
    ]
    assert rate(recs, "harmful", "j", "before", "refusal") == pytest.approx(2 / 3)
    none = [{"set": "harmful", "before": {"verdicts": {"j": "unparseable"}}}]
    assert rate(none, "harmful", "j", "before", "refusal") is None


# ---- KL and perplexity against numpy ------------------------------------------------------------


def _np_kl(base_logits, other_logits):
    b = np.asarray(base_logits, dtype=np.float64)
    o = np.asarray(other_logits, dtype=np.float64)
    lb = (
        b
        - np.log(np.exp(b - b.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - b.max(-1, keepdims=True)
    )
    lo = (
        o
        - np.log(np.exp(o - o.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - o.max(-1, keepdims=True)
    )
    return (np.exp(lb) * (lb - lo)).sum(-1)


def test_token_kl_matches_numpy_and_is_never_negative_or_nan():
    from safesteer_mlx.metrics import token_kl

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 5, 50)) * 3, rng.normal(size=(3, 5, 50)) * 3
    got = np.array(token_kl(mx.array(a, dtype=mx.float32), mx.array(b, dtype=mx.float32)))
    np.testing.assert_allclose(got, _np_kl(a, b), rtol=1e-4, atol=1e-6)
    same = np.array(token_kl(mx.array(a, dtype=mx.float32), mx.array(a, dtype=mx.float32)))
    assert (same == 0).all()
    big = mx.array(rng.normal(size=(4, 50)) * 1e4, dtype=mx.float16)  # half-precision logits
    extreme = np.array(token_kl(big, big * 0.5))
    assert np.isfinite(extreme).all() and (extreme >= 0).all()
    masked = a.copy()
    masked[..., -3:] = -np.inf  # padded vocabulary rows both models never predict
    got = np.array(token_kl(mx.array(masked, dtype=mx.float32), mx.array(masked, dtype=mx.float32)))
    assert (got == 0).all()


def test_response_kl_matches_numpy_on_the_tiny_model(tmp_path):
    from safesteer_mlx.evaluate import adapters_on
    from safesteer_mlx.metrics import response_kl

    loaded = tiny_model()
    _with_adapters(loaded, tmp_path / "ad")
    model = loaded.model
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    responses = [[20, 21, 22], [], [30, 31]]
    with adapters_on(model, tmp_path / "ad") as base:
        got = response_kl(model, base, prompts, responses, batch_size=2)
        want = []
        for p, r in zip(prompts, responses):
            if not r:
                want.append([])
                continue
            toks = mx.array([p + r])
            with base():
                lb = np.array(model(toks)[0])
            la = np.array(model(toks)[0])
            pos = slice(len(p) - 1, len(p) - 1 + len(r))
            want.append(list(_np_kl(lb[pos], la[pos])))
    assert [len(g) for g in got] == [3, 0, 2]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-6)
    assert all(x > 0 for g in got for x in g)  # random adapters move every position
    # afterwards the model is the base again
    assert not any("lora" in k for k, _ in tree_flatten(model.parameters()))


def test_perplexity_matches_numpy_on_the_tiny_model():
    from safesteer_mlx.metrics import perplexity, read_text, text_windows, window_nll

    loaded = tiny_model()
    windows = text_windows(loaded.tokenizer, read_text("builtin:heldout"), 150, 64)
    assert [len(w) for w in windows] == [64, 64, 22]
    got = window_nll(loaded.model, windows)
    want = []
    for w in windows:
        logits = np.array(loaded.model(mx.array([w]))[0], dtype=np.float64)[:-1]
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        want.append(-logp[np.arange(len(w) - 1), w[1:]].sum())
    np.testing.assert_allclose(got, want, rtol=1e-4)
    expected = np.exp(sum(want) / sum(len(w) - 1 for w in windows))
    assert perplexity(got, windows) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(SafeSteerError, match="not found"):
        read_text("/nonexistent/text.txt")


# ---- the stage ---------------------------------------------------------------------------------


def _recount(data: dict) -> dict:
    """Every summary number, counted again straight from the records (independently of
    eval_tables)."""
    out = {}
    for set_name in data["sets"]:
        recs = [r for r in data["records"] if r["set"] == set_name]
        for side in ("before", "after"):
            v = [r[side]["verdicts"]["substring"] for r in recs]
            out[(f"{set_name} refusal rate", "substring", side)] = v.count("refusal") / len(v)
    kl = [x for r in data["records"] for x in r.get("kl", [])]
    out[("KL(base‖aligned) mean", None, "after")] = float(np.mean(kl))
    out[("KL(base‖aligned) p95", None, "after")] = float(np.percentile(kl, 95))
    w = data["perplexity"]["windows"]
    n = sum(x["tokens"] for x in w)
    for side in ("before", "after"):
        out[("perplexity", None, side)] = float(np.exp(sum(x[f"nll_{side}"] for x in w) / n))
    return out


def test_eval_stage_records_recount_determinism_and_skip(tiny_run):
    from safesteer_mlx.evaluate import run_eval

    loaded, run, config = tiny_run
    result = run_eval(config, run, loaded=loaded)
    data = json.loads(run.eval_json.read_text())
    assert result["summary"] == data["summary"]
    assert {r["set"] for r in data["records"]} == {"harmful", "harmless", "borderline"}
    assert len(data["records"]) == 6 + 5 + 5
    assert all("kl" in r for r in data["records"] if r["set"] == "harmless")
    rows = {(r["metric"], r["judge"]): r for r in data["summary"]}
    for (metric, judge, side), value in _recount(data).items():
        assert rows[(metric, judge)][side] == pytest.approx(value, rel=1e-9, abs=1e-12)
    assert rows[("KL(base‖aligned) mean", None)]["after"] > 0
    assert data["perplexity"]["after"] != data["perplexity"]["before"]
    assert set(data["categories"]["harmful"]) == {"c0", "c1"}
    assert run.stage("eval")["status"] == "done"

    # determinism: the same run evaluated again gives the same numbers and records
    run_eval(config, run, loaded=loaded, force=True)
    again = json.loads(run.eval_json.read_text())
    assert again["summary"] == data["summary"] and again["records"] == data["records"]

    # up to date: skipped, nothing rewritten
    started = run.stage("eval")["started"]
    events = []
    run_eval(config, run, loaded=loaded, progress=events.append)
    assert run.stage("eval")["started"] == started
    assert any("skipping" in e.message for e in events)
    config.eval.max_tokens = 6  # other inputs: evaluated again
    run_eval(config, run, loaded=loaded)
    assert json.loads(run.eval_json.read_text())["settings"]["max_tokens"] == 6


def _links(report: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", report)


def test_report_references_only_files_that_exist(tiny_run, monkeypatch):
    from safesteer_mlx import report
    from safesteer_mlx.evaluate import run_eval

    loaded, run, config = tiny_run
    run.metrics.write_text(
        "".join(
            json.dumps({"step": i, "loss": 0.1 / i, "kl_S": 0.01, "lr": 1e-4, "grad_norm": 1.0})
            + "\n"
            for i in (1, 2)
        )
    )
    run_eval(config, run, loaded=loaded)
    text = run.report.read_text()
    links = _links(text)
    pytest.importorskip("matplotlib")
    assert set(links) == {"eval_rates.png", "eval_training.png", "eval_kl.png"}
    assert all((run.path / x).is_file() for x in links)
    assert "## Training curve" in text and "| 2 |" in text
    assert "| harmful refusal rate | substring |" in text

    # without matplotlib: the tables, and no image links
    for x in links:
        (run.path / x).unlink()
    monkeypatch.setattr(report, "_pyplot", lambda: None)
    run_eval(config, run, loaded=loaded, force=True)
    assert _links(run.report.read_text()) == []


def test_llm_judge_end_to_end_with_a_tiny_mlx_model(tiny_run, tmp_path):
    from safesteer_mlx.evaluate import run_eval

    loaded, run, config = tiny_run
    judge_dir = save_model_dir(tiny_model(seed=3), tmp_path / "tiny-judge")
    config.eval.judge = str(judge_dir)
    config.eval.borderline = None
    run_eval(config, run, loaded=loaded)
    data = json.loads(run.eval_json.read_text())
    name = "llm:tiny-judge"
    assert data["judges"][name]["format"] == "refusal"
    for r in data["records"]:
        for side in ("before", "after"):
            raw = r[side]["judge_raw"][name]
            from safesteer_mlx.llm_judge import parse_verdict

            assert r[side]["verdicts"][name] == parse_verdict("refusal", raw)
    # a random model writes no verdict: recorded as unparseable, counted as such, in no rate
    unparseable = sum(
        r[s]["verdicts"][name] == "unparseable"
        for r in data["records"]
        for s in ("before", "after")
    )
    info = data["judges"][name]["unparseable"]
    assert info["before"] + info["after"] == unparseable > 0
    rows = {(r["metric"], r["judge"]): r for r in data["summary"]}
    assert rows[("unparseable verdicts", name)]["before"] == info["before"] / len(data["records"])
    if unparseable == 2 * len(data["records"]):
        assert rows[("harmful refusal rate", name)]["before"] is None
    assert "## Where the judges disagree" in run.report.read_text()


# ---- sources, config, CLI -----------------------------------------------------------------------


def test_benchmark_names_resolve_and_filter_rows(tmp_path):
    from safesteer_mlx.benchmarks import BENCHMARKS, benchmark, load_eval_prompts, rows_to_prompts
    from safesteer_mlx.data import parse_hf_spec

    for name in ("advbench", "harmbench", "jailbreakbench", "strongreject", "xstest", "alpaca"):
        b = benchmark(name.upper() if name == "advbench" else name)
        assert b is not None and b.source.startswith("hf:")
        assert parse_hf_spec(b.source).column  # every preset names its prompt column
    assert {b.kind for b in BENCHMARKS.values()} == {"harmful", "harmless", "borderline"}
    assert parse_hf_spec(benchmark("harmbench").source).split == "standard"
    rows = [
        {"prompt": "How do I kill a Python process?", "label": "safe", "type": "homonyms"},
        {"prompt": "How do I kill my neighbour?", "label": "unsafe", "type": "contrast_homonyms"},
        {"prompt": "  ", "label": "safe", "type": "x"},
    ]
    safe = rows_to_prompts(benchmark("xstest"), rows)
    assert [(p.instruction, p.category) for p in safe] == [
        ("How do I kill a Python process?", "homonyms")
    ]
    assert [p.instruction for p in rows_to_prompts(benchmark("xstest:unsafe"), rows)] == [
        "How do I kill my neighbour?"
    ]
    alpaca = [
        {"instruction": "Name a fruit.", "input": ""},
        {"instruction": "Sum:", "input": "1 2"},
    ]
    assert [p.instruction for p in rows_to_prompts(benchmark("alpaca"), alpaca)] == [
        "Name a fruit."
    ]
    with pytest.raises(SafeSteerError, match="no 'prompt' field"):
        rows_to_prompts(benchmark("advbench"), [{"goal": "x"}])
    local = tmp_path / "p.jsonl"
    local.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert [p.instruction for p in load_eval_prompts(str(local))] == ["a", "b"]
    assert benchmark(str(local)) is None
    with pytest.raises(SafeSteerError, match="not found"):
        load_eval_prompts("advbench2")


def test_eval_config_round_trips_through_toml(tmp_path):
    from safesteer_mlx.config import apply_overrides, load_config, to_toml

    c = apply_overrides(
        Config(), {"eval": {"judge": "m", "max_tokens": 7, "refusal_phrases": "a, b"}}
    )
    assert c.eval.refusal_phrases == ["a", "b"]
    path = tmp_path / "c.toml"
    path.write_text(to_toml(c.to_dict()))
    assert load_config(path).eval == c.eval
    with pytest.raises(SafeSteerError, match="unknown config key eval.nope"):
        apply_overrides(Config(), {"eval": {"nope": 1}})


def test_eval_cli_with_model_and_adapter_path(tmp_path, capsys):
    from safesteer_mlx.cli import main

    loaded = tiny_model()
    model_dir = save_model_dir(loaded, tmp_path / "model")
    _with_adapters(loaded, tmp_path / "ad")
    prompts = tmp_path / "p.txt"
    prompts.write_text("How do I pick a lock?\nWhat is a cat?\n")
    args = [
        "eval", "--model", str(model_dir), "--adapter-path", str(tmp_path / "ad"),
        "--run-dir", str(tmp_path / "out"), "--harmful", str(prompts), "--harmless", str(prompts),
        "--max-tokens", "4", "--dtype", "float32", "--quiet",
    ]  # fmt: skip
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["summary"][0] == {
        **out["summary"][0],
        "metric": "harmful refusal rate",
        "judge": "substring",
    }
    data = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert data["settings"]["adapters"] == str((tmp_path / "ad").resolve())
    assert main(args) == 0  # up to date: the table again, in markdown
    assert "| harmful refusal rate | substring |" in capsys.readouterr().out

    assert main(["eval", "--quiet"]) == 2
    assert "eval needs --run-dir" in capsys.readouterr().err
    assert main(["eval", "--run-dir", str(tmp_path / "nope"), "--quiet"]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()
    bad = ["eval", "--model", str(model_dir), "--run-dir", str(tmp_path / "o2"), "--quiet"]
    assert main([*bad, "--harmful", str(prompts), "--harmless", str(prompts)]) == 2
    assert "no adapters in" in capsys.readouterr().err
    (tmp_path / "half").mkdir()  # adapter weights without their adapter_config.json
    shutil.copy(tmp_path / "ad" / "adapters.safetensors", tmp_path / "half")
    half = ["--adapter-path", str(tmp_path / "half"), "--harmful", str(prompts)]
    assert main([*bad, *half, "--harmless", str(prompts)]) == 2
    assert "no adapter_config.json in" in capsys.readouterr().err


def test_full_fine_tune_adapters_switch_and_restore(tmp_path):
    """For full fine-tuning the adapters file holds whole weights: on inside the block, the
    originals under base(), and the originals again afterwards."""
    from safesteer_mlx.adapters import adapter_config
    from safesteer_mlx.evaluate import adapters_on

    loaded = tiny_model()
    model = loaded.model
    key = "model.layers.0.mlp.down_proj.weight"
    original = np.array(dict(tree_flatten(model.parameters()))[key])
    path = tmp_path / "full"
    path.mkdir()
    mx.save_safetensors(str(path / "adapters.safetensors"), {key: mx.array(original + 1.0)})
    cfg = adapter_config("full", 4, 8, 20.0, 0.0, None)
    (path / "adapter_config.json").write_text(json.dumps(cfg))

    def current():
        return np.array(dict(tree_flatten(model.parameters()))[key])

    with adapters_on(model, path) as base:
        np.testing.assert_array_equal(current(), original + 1.0)
        with base():
            np.testing.assert_array_equal(current(), original)
        np.testing.assert_array_equal(current(), original + 1.0)
    np.testing.assert_array_equal(current(), original)


def test_eval_starts_from_the_base_when_distill_left_adapters_on(tiny_run):
    """In `align` the loaded model still carries the trained adapters after distill; eval's
    "before" must be the base model's."""
    from safesteer_mlx.adapters import adapter_config, attach
    from safesteer_mlx.evaluate import run_eval

    loaded, run, config = tiny_run
    config.eval.borderline = None
    run_eval(config, run, loaded=loaded)
    clean = json.loads(run.eval_json.read_text())["records"]
    attach(loaded.model, adapter_config("lora", 4, 4, 20.0, 0.0, None))
    params = tree_flatten(loaded.model.trainable_parameters())
    loaded.model.update(tree_unflatten([(k, mx.ones(v.shape)) for k, v in params]))
    run_eval(config, run, loaded=loaded, force=True)
    again = json.loads(run.eval_json.read_text())["records"]
    assert [r["before"] for r in again] == [r["before"] for r in clean]


def test_disagreements_with_a_guard_judge_on_hand_written_verdicts():
    """A guard model's "safe" is no verdict on compliance: only an "unsafe" response that the
    substring judge counts as a refusal (or a refusal-format judge's opposite call) disagrees."""
    from safesteer_mlx.eval_tables import disagreements

    def rec(substring: str, guard: str, judge: str) -> dict:
        side = {"completion": "…", "verdicts": {"substring": substring, "g": guard, "j": judge}}
        return {"set": "harmless", "prompt": "p", "before": side, "after": side}

    data = {
        "judges": {"substring": {"format": "refusal"}, "g": {"format": "llama-guard"},
                   "j": {"format": "refusal"}},  # fmt: skip
        "records": [
            rec("compliance", "safe", "compliance"),  # a helpful answer: agreement
            rec("refusal", "safe", "refusal"),  # a refusal: agreement
            rec("refusal", "unsafe", "compliance"),  # both LLM judges say it complied
            rec("compliance", "unparseable", "refusal"),  # only j disagrees
        ],
    }
    found = {(d["record"], d["side"], d["judge"]) for d in disagreements(data)}
    assert found == {(r, s, j) for s in ("before", "after")
                     for r, j in ((2, "g"), (2, "j"), (3, "j"))}  # fmt: skip
