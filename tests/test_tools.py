"""The tool layer: calculator, tool-call parsing, the environment, the Python sandbox, BM25 search.

Expected values come from Python itself (exact ints), hand-written strings, or the BM25 formula written
out independently. Sandbox tests run real subprocesses and check effects on the file system, the clock
and the parent's memory, not only the returned text.
"""

from __future__ import annotations

import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import hydra
import pytest
from omegaconf import OmegaConf

from src.tools import (
    BM25,
    Calculator,
    CalculatorError,
    FunctionTool,
    PythonTool,
    SearchTool,
    ToolArgumentError,
    ToolCall,
    ToolCallError,
    ToolEnvironment,
    evaluate,
    has_tool_call,
    parse_tool_calls,
    validate_arguments,
)
from src.tools.python_exec import namespaces_available

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "tools"
pytestmark = pytest.mark.timeout(60)


def call(name: str, **arguments) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


# --------------------------------------------------------------------------------------------------
# Calculator
# --------------------------------------------------------------------------------------------------

A = 123456789012345678901234567890123456789
B = 98765432109876543210987654321


def test_calculator_big_integer_arithmetic_is_exact():
    assert evaluate(f"{A} * {B} + {A} // 7 - {B} % 13") == A * B + A // 7 - B % 13
    assert evaluate("2**521 - 1") == 2**521 - 1
    assert evaluate(f"-{A} // {B}") == -A // B and evaluate(f"-{A} % {B}") == -A % B
    # exact division of big ints stays an int (a float is wrong in the 17th digit)
    assert evaluate(f"{A * B} / {B}") == A and isinstance(evaluate(f"{A * B} / {B}"), int)
    assert Calculator()(expression=f"{A} * {B}") == str(A * B)


@pytest.mark.parametrize("expr, value", [
    ("2 + 3 * 4 ** 2", 50), ("(2 + 3) * 4", 20), ("-2 ** 2", -4), ("2 ** 3 ** 2", 512), ("2 ** -1", 0.5),
    ("7 // 2", 3), ("-7 // 2", -4), ("7 % 3", 1), ("10 / 4", 2.5), ("1 - 2 - 3", -4), ("2 * -3", -6),
    ("abs(-5) + max(1, 7, 3) - min(4, 2)", 10), ("round(2.675, 2)", 2.67), ("round(7.5)", 8),
    ("sqrt(144)", 12), ("sqrt(2)", math.sqrt(2)), ("3^2", 9), ("2 ** 0.5", math.sqrt(2)),
    ("1.0000000001 ** 100000", 1.0000000001**100000), ("(-2) ** 3", -8), ("0.5 ** 2000", 0.5**2000),
])
def test_calculator_precedence_and_functions(expr, value):
    assert evaluate(expr) == value
    assert type(evaluate(expr)) is type(value)


@pytest.mark.parametrize("expr, match", [
    ("__import__('os')", "function '__import__' is not allowed"),
    ("x + 1", "unknown name 'x'"),
    ("(1).real", "attribute access"),
    ("open('f')", "function 'open' is not allowed"),
    ("'a' * 3", "only numbers"),
    ("True + 1", "only numbers"),
    ("1 < 2", "Compare is not allowed"),
    ("lambda: 1", "Lambda is not allowed"),
    ("[1, 2]", "List is not allowed"),
    ("1 / 0", "division by zero"),
    ("sqrt(-1)", "negative"),
    ("(-8) ** 0.5", "not a real number"),
    ("2 +", "cannot parse"),
    ("", "empty"),
])
def test_calculator_refuses_everything_else(expr, match):
    with pytest.raises(CalculatorError, match=match):
        evaluate(expr)


@pytest.mark.parametrize("expr", ["9**9**9", "10**10**10", "2**(10**100)", "(10**3000) * (10**3000)",
                                  "(2**13000) * (2**13000)", "1.5 ** 10**9", "10 ** 400.0",
                                  "2.0 ** (10**5000)"])
def test_calculator_refuses_huge_results_quickly(expr):
    start = time.perf_counter()
    with pytest.raises(CalculatorError, match="too large|more than 4000 digits"):
        evaluate(expr, max_digits=4000)
    # a bound on "refused before computing", not a timing: 9**9**9 alone would take minutes, so 2 s leaves a
    # loaded CI machine its pauses
    assert time.perf_counter() - start < 2.0


def test_calculator_digit_limit_is_the_boundary():
    assert evaluate("10**3999", max_digits=4000) == 10**3999  # 4000 digits: allowed
    with pytest.raises(CalculatorError):
        evaluate("10**4100", max_digits=4000)


# --------------------------------------------------------------------------------------------------
# Tool-call parsing and argument validation
# --------------------------------------------------------------------------------------------------

TOOLS = {"calculator": Calculator(), "python": PythonTool(timeout_s=1.0)}


def test_parse_one_and_several_calls_in_order():
    text = ("Let me compute.\n" + call("calculator", expression="1+1") + "\nand also\n"
            + call("python", code="print(2)") + "\nthen answer")
    calls = parse_tool_calls(text, TOOLS)
    assert calls == [ToolCall("calculator", {"expression": "1+1"}, calls[0].raw),
                     ToolCall("python", {"code": "print(2)"}, calls[1].raw)]
    assert has_tool_call(text) and not has_tool_call("The answer is 4.")
    assert parse_tool_calls("no calls here", TOOLS) == []


def test_parse_arguments_given_as_a_json_string_or_under_parameters():
    text = '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"6*7\\"}"}</tool_call>'
    (c,) = parse_tool_calls(text, TOOLS)
    assert isinstance(c, ToolCall) and c.arguments == {"expression": "6*7"}
    (c,) = parse_tool_calls('<tool_call>{"name": "f", "parameters": {"expression": "1"}}</tool_call>')
    assert c.arguments == {"expression": "1"}


@pytest.mark.parametrize("body, match", [
    ('{"name": "calculator", "arguments": {"expression": "1"}', "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"arguments": {"expression": "1"}}', 'no "name"'),
    ('{"name": "", "arguments": {}}', 'no "name"'),
    ('{"name": "calculator", "arguments": "{not json"}', "string that is not valid JSON"),
    ('{"name": "calculator", "arguments": [1]}', "must be a JSON object"),
])
def test_parse_malformed_blocks_become_errors(body, match):
    (c,) = parse_tool_calls(f"<tool_call>{body}</tool_call>", TOOLS)
    assert isinstance(c, ToolCallError) and c.kind == "malformed" and match in c.message


def test_parse_unterminated_block_and_a_block_opened_twice():
    calls = parse_tool_calls('<tool_call>{"name": "calculator"' + call("calculator", expression="2"), TOOLS)
    assert [type(c) for c in calls] == [ToolCallError, ToolCall]
    assert "unterminated" in calls[0].message
    (c,) = parse_tool_calls('<tool_call>{"name": "calculator", "arguments": {"expression": "1"}}', TOOLS)
    assert isinstance(c, ToolCallError) and "unterminated" in c.message


def test_parse_unknown_tool_and_wrong_arguments():
    unknown, missing, extra, wrong_type = parse_tool_calls(
        call("foo", x=1) + call("calculator") + call("calculator", expression="1", precision=3)
        + call("calculator", expression=3), TOOLS)
    assert unknown.kind == "unknown_tool"
    assert unknown.message == "unknown tool 'foo'; available: calculator, python"
    assert missing.kind == "bad_arguments"
    assert "missing required argument(s) ['expression']" in missing.message
    assert extra.kind == "bad_arguments" and "unknown argument(s) ['precision']" in extra.message
    assert wrong_type.kind == "bad_arguments" and "must be string, got integer 3" in wrong_type.message
    # without tools only the syntax is checked
    assert isinstance(parse_tool_calls(call("foo", x=1))[0], ToolCall)


def test_validate_arguments_json_types():
    schema = {"type": "object", "required": ["n"],
              "properties": {"n": {"type": "integer"}, "x": {"type": "number"}, "flag": {"type": "boolean"},
                             "mode": {"type": "string", "enum": ["a", "b"]}}}
    assert validate_arguments("t", schema, {"n": 3.0, "x": 2, "flag": False, "mode": "a"}) == \
        {"n": 3, "x": 2, "flag": False, "mode": "a"}
    for bad, match in [({"n": True}, "must be integer, got boolean"), ({"n": 1.5}, "must be integer"),
                       ({"n": 1, "x": "2"}, "must be number, got string"),
                       ({"n": 1, "flag": 1}, "must be boolean"),
                       ({"n": 1, "mode": "c"}, "must be one of"), ("n=1", "must be a JSON object")]:
        with pytest.raises(ToolArgumentError, match=match):
            validate_arguments("t", schema, bad)


# --------------------------------------------------------------------------------------------------
# The environment
# --------------------------------------------------------------------------------------------------


def _raise(**_):
    raise RuntimeError("disk on fire")


def test_environment_turns_every_failure_into_an_error_message():
    sleepy = FunctionTool(lambda: time.sleep(5), "sleepy", "sleeps")
    boom = FunctionTool(_raise, "boom", "raises")
    env = ToolEnvironment([Calculator(), sleepy, boom], timeout_s=0.5, max_calls_per_turn=7)
    text = ("<tool_call>{oops</tool_call>" + call("nope") + call("calculator", expr="1") + call("boom")
            + call("sleepy") + call("calculator", expression="9**9**9") + call("calculator", expression="6*7")
            + call("calculator", expression="1"))
    start = time.perf_counter()
    messages = env.execute(text)
    assert time.perf_counter() - start < 3.0  # the sleeping tool is abandoned at the timeout
    assert all(m["role"] == "tool" for m in messages) and len(messages) == 8
    contents = [m["content"] for m in messages]
    assert contents[0].startswith("error: tool call is not valid JSON")
    assert contents[1] == "error: unknown tool 'nope'; available: boom, calculator, sleepy"
    assert contents[2] == ("error: 'calculator' got unknown argument(s) ['expr'] and is missing required "
                           "argument(s) ['expression']; expected: expression")
    assert contents[3] == "error: tool 'boom' raised RuntimeError: disk on fire"
    assert contents[4] == "error: tool 'sleepy' timed out after 0.5s"
    assert contents[5] == "error: result would have more than 4000 digits"
    assert contents[6] == "42"
    assert contents[7] == "error: too many tool calls in one turn (at most 7)"
    assert [m["name"] for m in messages] == ["invalid", "nope", "calculator", "boom", "sleepy", "calculator",
                                             "calculator", "calculator"]
    m = env.metrics()
    keys = ["calls", "malformed", "invalid", "failed", "timeouts", "refused", "errors"]
    assert [m[f"tools/{k}"] for k in keys] == [8, 1, 2, 3, 1, 1, 7]
    assert (m["tools/calculator/calls"], m["tools/boom/calls"], m["tools/sleepy/calls"]) == (2, 1, 1)
    assert m["tools/error_rate"] == pytest.approx(7 / 8)
    assert env.execute("no call") == []
    env.reset_metrics()
    assert env.metrics()["tools/calls"] == 0


def test_environment_caps_output_and_checks_its_tools():
    env = ToolEnvironment([FunctionTool(lambda: "y" * 1000, "long")], max_output_chars=100)
    (m,) = env.execute(call("long"))
    assert m["content"].startswith("y" * 100) and "truncated: 900 more characters" in m["content"]
    with pytest.raises(ValueError, match="two tools are named 'calculator'"):
        ToolEnvironment([Calculator(), Calculator()])
    with pytest.raises(ValueError, match="must fire first"):
        ToolEnvironment([PythonTool(timeout_s=10)], timeout_s=5)


def test_schema_is_the_function_definition_format():
    env = ToolEnvironment([Calculator(), PythonTool(timeout_s=1), SearchTool()], timeout_s=5)
    schemas = env.schemas()
    assert json.loads(json.dumps(schemas)) == schemas
    for s, name, arg in zip(schemas, ["calculator", "python", "search"], ["expression", "code", "query"]):
        assert set(s) == {"type", "function"} and s["type"] == "function"
        assert set(s["function"]) == {"name", "description", "parameters"} and s["function"]["name"] == name
        params = s["function"]["parameters"]
        assert params["type"] == "object" and params["required"] == [arg]
        assert params["properties"][arg]["type"] == "string"


# A Qwen2.5-style template with a tools section (the project's CHATML_TEMPLATE ignores `tools`).
from src.tools.episodes import TOOL_CHAT_TEMPLATE as QWEN_TOOLS_TEMPLATE


def test_schemas_and_tool_messages_render_through_a_chat_template():
    from src.modules.models.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    tok.chat_template = QWEN_TOOLS_TEMPLATE
    env = ToolEnvironment([Calculator(), SearchTool([{"title": "t", "text": "x"}])], timeout_s=5)
    turn = "I will compute it.\n" + call("calculator", expression="2**64")
    messages = [{"role": "user", "content": "What is 2**64?"}, {"role": "assistant", "content": turn},
                *env.execute(turn)]
    text = tok.apply_chat_template(messages, tools=env.schemas(), add_generation_prompt=True, tokenize=False)
    listed = text.split("<tools>\n")[1].split("\n</tools>")[0].split("\n")
    assert [json.loads(line) for line in listed] == env.schemas()
    assert f"<tool_response>\n{2**64}\n</tool_response>" in text
    ids = tok.apply_chat_template(messages, tools=env.schemas(), add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert tok.decode(ids) == text


# --------------------------------------------------------------------------------------------------
# The Python sandbox
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def python():
    return PythonTool(timeout_s=2.0, memory_mb=512, max_output_chars=1000, max_file_mb=4)


def test_sandbox_runs_code_and_reports_its_errors(python):
    assert python(code="print(sum(range(10)))\nprint('done')") == "45\ndone"
    assert python(code="x = 1") == "(no output; print() the values you need)"
    out = python(code="print('before')\n1 / 0")
    assert out.startswith("error: exit code 1\nbefore\nTraceback")
    assert out.endswith("ZeroDivisionError: division by zero")
    assert "<sandbox>" not in out and 'File "<tool>", line 2' in out
    assert python(code="def f(:\n  pass").startswith("error: exit code 1\n  File \"<tool>\", line 1")
    assert python(code="print(1)\x00").startswith("error: exit code 1")
    assert python(code="import sys; sys.exit(3)") == "error: exit code 3"


@pytest.mark.parametrize("code", ["while True:\n    pass", "import time\ntime.sleep(60)"])
def test_sandbox_time_limit(python, code):
    start = time.perf_counter()
    out = python(code=code)
    elapsed = time.perf_counter() - start
    assert out.startswith("error:") and ("timed out" in out or "CPU time limit" in out), out
    assert elapsed < python.timeout_s + 3.0


def test_sandbox_refuses_writes_outside_its_directory(python, tmp_path):
    target, keep = tmp_path / "escape.txt", tmp_path / "keep.txt"
    keep.write_text("precious")
    for code in [f"open({str(target)!r}, 'w').write('x')",
                 f"import os\nos.close(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT))",
                 f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
                 f"import os\nos.symlink({str(tmp_path)!r}, 'link')\nopen('link/escape.txt', 'w').write('x')",
                 f"import os\nos.remove({str(keep)!r})",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})"]:
        out = python(code=code)
        assert out.startswith("error:") and "writing outside the working directory" in out, (code, out)
    assert not target.exists() and keep.read_text() == "precious"
    # inside its own directory the program may write and read back
    assert python(code="open('a.txt', 'w').write('hi')\nprint(open('a.txt').read())") == "hi"


@pytest.mark.parametrize("code", [
    "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)",
    "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM)",
    "import _socket\n_socket.socket()",
    "import socket\nsocket.getaddrinfo('example.com', 80)",
    "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)",
])
def test_sandbox_has_no_network(python, code):
    out = python(code=code)
    assert out.startswith("error:") and "network access is disabled" in out, out


def test_sandbox_refuses_processes_and_limit_changes(python):
    for code in ["import subprocess\nsubprocess.run(['true'])", "import os\nos.system('true')"]:
        assert "starting processes is disabled" in python(code=code)
    assert "signalling other processes" in python(code="import os\nos.kill(os.getpid() + 1, 0)")
    out = python(code="import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))")
    assert "resource limits cannot be changed" in out


def test_sandbox_refuses_reads_sqlite_fifos_and_ctypes_escapes(python, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("credentials")
    for code, says in [(f"print(open({str(secret)!r}).read())", "reading outside the working directory"),
                       ("print(open('/etc/passwd').read())", "reading outside the working directory"),
                       (f"import os\nprint(os.listdir({str(tmp_path)!r}))", "reading outside the working directory"),
                       (f"import sqlite3\nsqlite3.connect({str(tmp_path / 'x.db')!r})", "SQLite is not available"),
                       (f"import sqlite3\nsqlite3.connect('file:{tmp_path / 'y.db'}?mode=rwc', uri=True)",
                        "SQLite is not available"),
                       (f"import os\nos.mkfifo({str(tmp_path / 'fifo')!r})", "has no attribute 'mkfifo'"),
                       ("import ctypes\nctypes.CDLL(None).system(b'true')", "calling C functions through ctypes"),
                       ("import ctypes\nctypes.CDLL(None)['fork']()", "calling C functions through ctypes"),
                       ("import ctypes\nctypes.CDLL(None).mkfifoat(-100, b'/tmp/f', 420)", "through ctypes"),
                       ("import os\nfd = os.open('/usr/share/zoneinfo', os.O_RDONLY)", "opening a directory outside"),
                       ("import os\nos.makedirs('a/b')\nos.chdir('a/b')", "changing the working directory"),
                       ("import _posixsubprocess\n_posixsubprocess.fork_exec()", "starting processes is disabled"),
                       # C modules that reach files or processes without an audit event, and fresh copies of the
                       # ones the prelude disarmed
                       ("import readline\nreadline.read_history_file('/etc/passwd')", "importing readline"),
                       ("import readline\nreadline.write_history_file('/tmp/outside')", "importing readline"),
                       ("import pwd\nprint(pwd.getpwuid(0))", "importing pwd"),
                       ("import sys\ndel sys.modules['_posixsubprocess']\nimport _posixsubprocess",
                        "importing _posixsubprocess"),
                       ("import sys\ndel sys.modules['posix']\nimport posix\nposix.mkfifo('/tmp/f')", "importing posix"),
                       ("import importlib.util as u\nu.module_from_spec(u.find_spec('_posixsubprocess'))",
                        "importing _posixsubprocess"),
                       # rebinding what the hook calls, or reaching its closure
                       ("import __main__\n__main__.isinstance = lambda *a: True\nopen('/etc/passwd').read()",
                        "reading outside the working directory"),
                       ("import os\nos.path.realpath = lambda p, **k: os.getcwd()\nopen('/etc/passwd').read()",
                        "reading outside the working directory"),
                       ("import gc\n[f for f in gc.get_objects() if getattr(f, '__name__', '') == 'hook']",
                        "walking the interpreter's objects through gc")]:
        out = python(code=code)
        assert out.startswith("error:") and says in out, (code, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret.txt"]
    # what a model's program needs still works: the standard library, numpy, sympy, files of its own
    ok = ("import ctypes, numpy, sympy, fractions, datetime, os, shutil\n"
          "os.makedirs('d')\nopen('d/x', 'w').write('5')\n"
          "print(int(open('d/x').read()), int(numpy.arange(4).sum()), fractions.Fraction(1, 3) * 3, sympy.isprime(97))")
    assert python(code=ok) == "5 6 1 True"


@pytest.mark.skipif(not namespaces_available(), reason="unshare cannot create namespaces on this machine")
def test_namespaces_give_no_network_and_kill_a_detached_child(tmp_path):
    # an interpreter wrapper that starts a detached (setsid) child before the hook exists: what native code could do
    wrapper = tmp_path / "python"
    marker = "31.4159"
    wrapper.write_text(f"#!/bin/sh\nsetsid sleep {marker} &\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)

    def survivors() -> int:
        return sum(marker in (p / "cmdline").read_bytes().decode(errors="replace")
                   for p in Path("/proc").iterdir() if p.name.isdigit() and (p / "cmdline").exists())

    isolated = PythonTool(timeout_s=2.0, python=str(wrapper), isolation="namespaces")
    assert isolated(code="import os\nprint(os.getpid())") == "1"  # PID 1 of its own namespace
    assert isolated(code="import socket\nsocket.if_nameindex and print(sorted(n for _, n in socket.if_nameindex()))") \
        == "['lo']"
    time.sleep(0.2)
    assert survivors() == 0
    before = survivors()
    PythonTool(timeout_s=2.0, python=str(wrapper), isolation="audit")(code="print(1)")
    time.sleep(0.2)
    leaked = survivors() - before
    subprocess.run(["pkill", "-f", f"sleep {marker}"], check=False)
    assert leaked == 1  # the audit hook alone cannot stop what runs outside Python: why namespaces exist


def test_isolation_setting_is_checked():
    with pytest.raises(ValueError, match="isolation must be one of"):
        PythonTool(isolation="docker")


def test_sandbox_memory_limit(python):
    out = python(code="b = bytearray(4 * 2**30)\nprint('allocated')")
    assert out.startswith("error:") and "MemoryError" in out and "allocated" not in out


def test_sandbox_output_is_capped_without_reading_it_all(python):
    roomy = PythonTool(timeout_s=5.0, max_output_chars=1000, max_file_mb=64)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    out = roomy(code="print('x' * 50_000_000)")
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert out == "x" * 1000 + "\n... [output truncated: 50000001 bytes in all]"
    assert grown_mib < 20  # the 50 MB the child wrote never reach the parent
    # past max_file_mb the write itself fails in the child: an error, with the head of the output
    out = python(code="print('x' * 50_000_000)")
    assert out.startswith("error: exit code 1\nxxx") and "File too large" in out
    assert len(out) <= python.max_output_chars + 100 and "output truncated: 4194304 bytes" in out


def test_sandbox_directory_is_removed_and_environment_is_clean(python):
    out = python(code="import os\nprint(os.getcwd())\nprint([k for k in os.environ if 'proxy' in k.lower()])")
    cwd, proxies = out.split("\n")
    assert Path(cwd).name == "work" and not Path(cwd).parent.exists()
    assert proxies == "[]"


# --------------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------------


def test_bm25_matches_the_closed_form():
    corpus = [["a", "b"], ["a", "a", "c"], ["d"]]
    k1, b = 1.2, 0.75
    got = BM25(corpus, k1=k1, b=b).scores(["a", "c", "zzz"])
    avgdl, N = 2.0, 3

    def term(f, dl, n):  # Lucene's form: the classic formula without its constant (k1 + 1) factor
        return math.log(1 + (N - n + 0.5) / (n + 0.5)) * f / (f + k1 * (1 - b + b * dl / avgdl))

    want = [term(1, 2, 2), term(2, 3, 2) + term(1, 3, 1), 0.0]
    assert got == pytest.approx(want, rel=1e-6)  # bm25s scores in float32
    assert BM25(corpus, k1=k1, b=b).scores(["c", "c", "a"]) == pytest.approx(got, rel=1e-6)  # a repeat counts once
    assert BM25([[], []]).scores(["a"]) == [0.0, 0.0] and BM25([]).scores(["a"]) == []


def test_search_tool_over_a_jsonl_file(tmp_path):
    docs = [{"title": "Paris", "text": "Paris is the capital and largest city of France."},
            {"title": "Berlin", "text": "Berlin is the capital of Germany."},
            {"title": "Rivers", "text": "The Rhine flows through Germany and the Netherlands."},
            {"title": "Zoo", "text": "Animals live here. " * 20 + "The zebra has stripes. " + "Lions. " * 20}]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    search = SearchTool(path=str(path), top_k=2, snippet_chars=80)
    out = search(query="capital of Germany")
    assert out.startswith("[1] Berlin\nBerlin is the capital of Germany.\n\n[2] ") and "[3]" not in out
    title, snippet = search(query="zebra").split("\n")
    assert title == "[1] Zoo" and snippet.startswith("...") and snippet.endswith("...")
    assert "The zebra has stripes." in snippet and len(snippet) <= 80 + 6
    assert search(query="volcano") == "no results for 'volcano'"
    assert SearchTool()(query="x") == "no results for 'x' (the collection is empty)"
    env = ToolEnvironment([search], timeout_s=5)
    (m,) = env.execute(call("search", query="  ?! "))
    assert m["content"] == "error: empty query: give some keywords"
    path.write_text(json.dumps(docs[0]) + "\n{broken\n")
    with pytest.raises(ValueError, match="docs.jsonl:2: bad JSON"):
        SearchTool(path=str(path))


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, tools", [("calculator", ["calculator"]),
                                         ("default", ["calculator", "python", "search"])])
def test_tool_configs_instantiate(make_cfg, name, tools):
    cfg = make_cfg(f"+tools={name}")
    env = hydra.utils.instantiate(cfg.tools)
    assert isinstance(env, ToolEnvironment) and list(env.tools) == tools
    assert env.execute(call("calculator", expression=f"{A} * {B}"))[0]["content"] == str(A * B)
    assert hydra.utils.instantiate(OmegaConf.load(CONFIGS / f"{name}.yaml")).schemas() == env.schemas()
