"""MathBenchmark reads the published benchmark layouts; bad rows are named by file and line; the eval
presets compose with Hydra and load the real files."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import hydra
import pytest

from src.datamodules.math import MathBenchmark, detect_format
from src.datamodules.rows import DataRowError
from src.modules.evaluation.grading import is_correct

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("REOPOLD_DATA", ROOT.parent / "shared" / "data")) / "math"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"benchmark files not at {DATA} (set REOPOLD_DATA)")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# file, rows, detected format, row 0: id, prompt start, a response graded right, one graded wrong
REAL = [
    ("gsm8k", 1319, "gsm8k", 0, "Janet\u2019s ducks lay 16 eggs", "so \\boxed{18}", "\\boxed{17}"),
    ("aime24", 30, "math", 60, "Every morning Aya goes for a $9$-kilometer", "\\boxed{204}", "\\boxed{240}"),
    ("amc23", 40, "amc", 0, "Cities $A$ and $B$ are $45$ miles apart", "\\boxed{27}", "\\boxed{28}"),
    ("minerva_math", 272, "minerva", 0, "Each of the two Magellan telescopes", "\\boxed{1.6}", "\\boxed{16}"),
]


@needs_data
@pytest.mark.parametrize("name,n,fmt,id0,prompt0,right,wrong", REAL, ids=[r[0] for r in REAL])
def test_real_benchmark_loads_with_auto_detection(name, n, fmt, id0, prompt0, right, wrong):
    path = DATA / f"{name}.jsonl"
    assert detect_format(json.loads(path.open().readline())) == fmt
    rows = MathBenchmark(str(path))()
    assert len(rows) == n
    assert rows[0]["id"] == id0 and rows[0]["prompt"].startswith(prompt0)
    assert is_correct(right, rows[0]["answer"]) and not is_correct(wrong, rows[0]["answer"])
    assert len({r["id"] for r in rows}) == n
    assert all(isinstance(r["prompt"], str) and r["answer"] for r in rows)


@needs_data
def test_real_references_keep_the_published_form():
    gsm8k = MathBenchmark(str(DATA / "gsm8k.jsonl"), limit=1)()[0]
    assert gsm8k["answer"].endswith("#### 18") and gsm8k["solution"] == gsm8k["answer"]
    assert MathBenchmark(str(DATA / "amc23.jsonl"))()[15]["answer"] == "-1"  # -1.0 in the file
    assert MathBenchmark(str(DATA / "aime24.jsonl"))()[7]["answer"] == "025"
    minerva = MathBenchmark(str(DATA / "minerva_math.jsonl"), limit=1)()[0]
    assert minerva["answer"] == minerva["solution"] and "\\boxed{1.6}" in minerva["answer"]


# format, rows, expected (id, answer, solution or None) per row
PRESETS = [
    ("gsm8k", [{"question": "2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"}],
     [(1, "2+2=<<2+2=4>>4\n#### 4", "2+2=<<2+2=4>>4\n#### 4")]),
    ("math", [{"problem": "p", "solution": "so \\boxed{\\frac12}", "answer": "\\frac12"},
              {"problem": "p", "solution": "thus \\boxed{3}"}],
     [(1, "\\frac12", "so \\boxed{\\frac12}"), (2, "thus \\boxed{3}", "thus \\boxed{3}")]),
    ("math500", [{"problem": "p", "solution": "s", "answer": "5", "unique_id": "test/algebra/1.json"}],
     [("test/algebra/1.json", "5", "s")]),
    ("aime", [{"problem": "p", "answer": "025", "id": 7}, {"problem": "p", "solution": "\\boxed{9}"}],
     [(7, "025", None), (2, "\\boxed{9}", "\\boxed{9}")]),
    ("amc", [{"question": "q", "answer": 27.0}, {"problem": "p", "answer": 2.5},
             {"problem": "p", "answer": -1.0}, {"question": "q", "answer": 12}],
     [(1, "27", None), (2, "2.5", None), (3, "-1", None), (4, "12", None)]),
    ("minerva", [{"problem": "p", "solution": "hence \\boxed{1.6} cm", "idx": 3}],
     [(3, "hence \\boxed{1.6} cm", "hence \\boxed{1.6} cm")]),
    ("olympiadbench", [{"id": 2231, "question": "q", "final_answer": ["$3$", "$\\frac{1}{2}$"],
                        "solution": ["first way", "second way"]},
                       {"id": 2232, "question": "q", "final_answer": ["$x^2$"], "solution": []},
                       {"id": 2233, "question": "q", "final_answer": ["$a$ or $b$"]}],
     [(2231, "3, \\frac{1}{2}", "first way"), (2232, "x^2", None), (2233, "$a$ or $b$", None)]),
]


@pytest.mark.parametrize("fmt,rows,expected", PRESETS, ids=[p[0] for p in PRESETS])
def test_preset_formats(tmp_path, fmt, rows, expected):
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    got = MathBenchmark(str(path), format=fmt)()
    assert [(r["id"], r["answer"], r.get("solution")) for r in got] == expected
    assert all(r["prompt"] in ("2+2?", "p", "q") for r in got)


@pytest.mark.parametrize("fmt,rows", [p[:2] for p in PRESETS if p[0] not in ("math500", "aime")],
                         ids=[p[0] for p in PRESETS if p[0] not in ("math500", "aime")])
def test_auto_detects_each_layout(fmt, rows):
    assert detect_format(rows[0]) == fmt


def test_undetectable_layout_names_the_keys(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"text": "t", "label": 1}])
    with pytest.raises(DataRowError, match=r"x.jsonl:1: cannot tell the format from the keys \['label', 't"):
        MathBenchmark(str(path))()


@pytest.mark.parametrize("layout", ["list", "data", "single_list", "jsonl_named_json"])
def test_json_files(tmp_path, layout):
    rows = [{"problem": "p1", "answer": "1"}, {"problem": "p2", "answer": "2"}]
    text = {"list": json.dumps(rows), "data": json.dumps({"data": rows, "version": "1"}),
            "single_list": json.dumps({"problems": rows, "meta": {"n": 2}}),
            "jsonl_named_json": "\n".join(map(json.dumps, rows))}[layout]
    (tmp_path / "x.json").write_text(text)
    got = MathBenchmark(str(tmp_path / "x.json"))()
    first_id = 1 if layout == "jsonl_named_json" else 0  # a line number, or an index into the list
    assert [(r["id"], r["prompt"], r["answer"]) for r in got] == [(first_id, "p1", "1"),
                                                                   (first_id + 1, "p2", "2")]


def test_json_bad_row_is_named_by_index(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps([{"problem": "p", "answer": "1"}, {"problem": "p"}, [1]]))
    with pytest.raises(DataRowError) as e:
        MathBenchmark(str(tmp_path / "x.json"), format="math")()
    path = tmp_path / "x.json"
    assert f"{path}:row 1: missing field 'answer' or 'solution' (has ['problem'])" in str(e.value)
    assert f"{path}:row 2: row is a list, not an object" in str(e.value)


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"question": ["a", "b", "c"], "answer": [27.0, 0.5, None], "url": ["u", "u", "u"]})
    pq.write_table(table, tmp_path / "amc.parquet")
    with pytest.raises(DataRowError, match=r"amc.parquet:row 2: empty answer \(field 'answer'\)"):
        MathBenchmark(str(tmp_path / "amc.parquet"))()
    got = MathBenchmark(str(tmp_path / "amc.parquet"), on_error="skip")()
    assert [(r["id"], r["prompt"], r["answer"]) for r in got] == [(0, "a", "27"), (1, "b", "0.5")]


def malformed(tmp_path) -> Path:
    return write_jsonl(tmp_path / "x.jsonl", [
        {"question": "q1", "answer": "#### 1"},
        {"question": "q2", "answer": "#### 2"},
        '{"question": "q3", "answer": ',
        {"question": "q4", "answer": "#### 4"},
        {"question": "q5", "foo": 1},
        "",
        {"question": "  ", "answer": "#### 7"},
    ])


def test_malformed_rows_are_listed_in_one_error(tmp_path):
    path = malformed(tmp_path)
    with pytest.raises(DataRowError) as e:
        MathBenchmark(str(path), format="gsm8k")()
    msg = str(e.value)
    assert "3 of 6 rows are malformed" in msg
    assert f"{path}:3: bad JSON" in msg
    assert f"{path}:5: missing field 'answer' (has ['foo', 'question'])" in msg
    assert f"{path}:7: empty prompt (field 'question')" in msg
    assert f"{path}:4" not in msg and f"{path}:6" not in msg


def test_skip_mode_warns_for_each_bad_row(tmp_path, caplog):
    path = malformed(tmp_path)
    with caplog.at_level(logging.WARNING, logger="src.datamodules.rows"):
        rows = MathBenchmark(str(path), format="gsm8k", on_error="skip")()
    assert [r["id"] for r in rows] == [1, 2, 4]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4
    for line in (3, 5, 7):
        assert sum(f"{path}:{line}:" in w for w in warnings) == 1
    assert "skipped 3 of 6 rows" in warnings[-1]


def test_long_error_lists_stop_at_twenty(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"problem": "p", "answer": "1"}] + [{"problem": "p"}] * 25)
    msg = str(pytest.raises(DataRowError, MathBenchmark(str(path), format="amc")).value)
    assert msg.count("missing field 'answer'") == 20 and "... and 5 more" in msg
    assert f"{path}:21:" in msg and f"{path}:22:" not in msg


def test_all_rows_bad_in_skip_mode_is_still_an_error(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", ["{not json", "[1, 2]"])
    with pytest.raises(DataRowError, match="no usable rows"):
        MathBenchmark(str(path), on_error="skip")()


def test_configurable_field_names(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [
        {"q": "what?", "a": 5.0, "sol": "because", "uid": "u1"},
        {"q": [{"role": "user", "content": "chat?"}], "a": "x", "sol": "since"},
    ])
    rows = MathBenchmark(str(path), prompt_field="q", answer_field="a", solution_field="sol")()
    chat = [{"role": "user", "content": "chat?"}]
    assert rows == [{"id": 1, "prompt": "what?", "answer": "5", "solution": "because"},
                    {"id": 2, "prompt": chat, "answer": "x", "solution": "since"}]
    # a preset's field can be replaced alone; an explicitly named solution is required
    path = write_jsonl(tmp_path / "y.jsonl", [{"question": "q", "final": "7"}, {"question": "q", "final": 8}])
    rows = MathBenchmark(str(path), format="gsm8k", answer_field="final")()
    assert [(r["prompt"], r["answer"]) for r in rows] == [("q", "7"), ("q", "8")]
    with pytest.raises(DataRowError, match=r"y.jsonl:1: missing field 'worked' \(has \['final', 'questi"):
        MathBenchmark(str(path), format="gsm8k", answer_field="final", solution_field="worked")()
    path = write_jsonl(tmp_path / "z.jsonl", [{"q": 3, "a": "1"}])
    with pytest.raises(DataRowError, match="z.jsonl:1: prompt is an int, neither text nor a list of chat"):
        MathBenchmark(str(path), prompt_field="q", answer_field="a")()


def test_limit_and_deterministic_shuffle(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"problem": f"p{i}", "answer": str(i)} for i in range(50)])
    assert [r["id"] for r in MathBenchmark(str(path), limit=3)()] == [1, 2, 3]
    a = [r["id"] for r in MathBenchmark(str(path), limit=10, shuffle_seed=0)()]
    assert a == [r["id"] for r in MathBenchmark(str(path), limit=10, shuffle_seed=0)()]
    assert a != [r["id"] for r in MathBenchmark(str(path), limit=10, shuffle_seed=1)()]
    assert a != list(range(1, 11)) and len(set(a)) == 10
    assert sorted(r["id"] for r in MathBenchmark(str(path), shuffle_seed=0)()) == list(range(1, 51))


def test_missing_file_names_path_and_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl does not exist.*data\.test\.path"):
        MathBenchmark(str(tmp_path / "nope.jsonl"))()


def test_bad_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="unknown format 'gsm9k'"):
        MathBenchmark("x.jsonl", format="gsm9k")
    with pytest.raises(ValueError, match="either a file"):
        MathBenchmark()
    with pytest.raises(ValueError, match="on_error"):
        MathBenchmark("x.jsonl", on_error="ignore")


def test_datasets_source(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "s\n#### 4"},
                                              {"question": "r", "answer": 2.0}])
    source = MathBenchmark(dataset="json", data_files=str(path), split="test", format="amc")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install datasets"):
            source()
        pytest.skip("datasets is not installed: checked the ImportError only")
    assert [(r["id"], r["answer"]) for r in source()] == [(0, "s\n#### 4"), (1, "2")]


PRESET_CONFIGS = [("gsm8k", "gsm8k", 1319), ("aime24", "aime24", 30), ("amc23", "amc23", 40),
                  ("minerva", "minerva_math", 272)]


@needs_data
@pytest.mark.parametrize("preset,file,n", PRESET_CONFIGS, ids=[p[0] for p in PRESET_CONFIGS])
def test_eval_presets_compose_and_load(make_cfg, preset, file, n):
    cfg = make_cfg(f"data={preset}", f"paths.root_dir={ROOT}", config="eval", fast=False)
    assert Path(cfg.data.test.path).resolve() == (DATA / f"{file}.jsonl").resolve()
    assert cfg.module.task == preset and cfg.data.val is None
    dm = hydra.utils.instantiate(cfg.data)
    test_rows = dm.sources["test"]()
    assert len(test_rows) == n and len(dm.sources["train"]()) == n
    assert dm.instruction.endswith("within \\boxed{}.")
    assert test_rows[0]["answer"] == MathBenchmark(str(DATA / f"{file}.jsonl"))()[0]["answer"]


def test_generic_math_config_composes(make_cfg, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"problem": f"p{i}", "answer": str(i)} for i in range(4)])
    test = write_jsonl(tmp_path / "test.jsonl", [{"question": "q", "answer": 3.0}])
    cfg = make_cfg("data=math", f"data.train.path={train}", f"data.test.path={test}", "data.train.limit=2",
                   config="eval", fast=False)
    dm = hydra.utils.instantiate(cfg.data)
    assert [r["answer"] for r in dm.sources["train"]()] == ["0", "1"]
    assert dm.sources["val"]() == dm.sources["test"]() == [{"id": 1, "prompt": "q", "answer": "3"}]


def test_plain_jsonl_prompts_name_every_bad_line(tmp_path):
    from src.datamodules.prompts import JsonlPrompts

    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "answer": 1}, "{oops", {"prompt": "b"},
                                              {"prompt": "c", "answer": "3"}])
    with pytest.raises(DataRowError) as e:
        JsonlPrompts(str(path))()
    assert f"{path}:2: bad JSON" in str(e.value) and f"{path}:3: missing field(s) ['answer']" in str(e.value)
    assert JsonlPrompts(str(path), on_error="skip")() == [{"prompt": "a", "answer": "1", "id": 1},
                                                          {"prompt": "c", "answer": "3", "id": 4}]  # ids: lines
    assert JsonlPrompts(str(path), on_error="skip", limit=1)() == [{"prompt": "a", "answer": "1", "id": 1}]
