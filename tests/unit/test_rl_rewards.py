"""mvlm.rl.rewards: the guide's plugin file (section 5.4) runs unchanged without ms-swift, the
built-ins follow ms-swift's definitions and flags, dataset columns reach the functions as keyword
arguments, and bad reward functions give located errors or counted skips."""
from __future__ import annotations

import importlib.util
import math
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mvlm.rl import rewards as R
from mvlm.rl.rewards import (
    ORM,
    RewardConfig,
    RewardFunctionError,
    build_rewards,
    load_external_plugins,
)

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "grpo" / "guide_5_4_plugin.py.txt"
GOOD = "<think>2 + 2 is 4</think>\n<answer>4</answer>"


@pytest.fixture(autouse=True)
def _registry():
    """Each test gets the built-in registry back (plugins register into a module-level dict)."""
    saved, origin = dict(R.orms), dict(R._ORIGIN)
    yield
    R.orms.clear()
    R.orms.update(saved)
    R._ORIGIN.clear()
    R._ORIGIN.update(origin)


@pytest.fixture
def guide_plugin(tmp_path) -> Path:
    p = tmp_path / "examples" / "train" / "grpo" / "plugin" / "plugin.py"
    p.parent.mkdir(parents=True)
    shutil.copyfile(FIXTURE, p)
    return p


def _plugin(tmp_path: Path, body: str, name: str = "p.py") -> str:
    p = tmp_path / name
    p.write_text("from swift.plugin import ORM, orms\n" + body)
    return str(p)


def test_guide_plugin_runs_unchanged_without_ms_swift(guide_plugin):
    assert importlib.util.find_spec("swift") is None  # the situation the shim is for
    cfg = RewardConfig(reward_funcs=["external_r1v_acc", "format"],
                       external_plugins=[str(guide_plugin)])
    rs = build_rewards(cfg)
    # the shim is gone again: nothing else can mistake mvlm for ms-swift
    assert "swift" not in sys.modules and "swift.plugin" not in sys.modules
    assert not any(type(f).__name__ == "_SwiftShim" for f in sys.meta_path)
    with pytest.raises(ModuleNotFoundError):
        __import__("swift.plugin")
    assert R._ORIGIN["external_r1v_acc"].endswith("plugin.py: MultiModalAccuracyORM")
    completions = [GOOD,                                   # right, well formed
                   "<answer>5</answer>",                   # wrong, no think block
                   "<think>half</think><answer>$\\frac{1}{2}$</answer>",  # right symbolically
                   "the answer is 7"]                      # no tag: whole text != "7"
    rows = [{"solution": "<answer>4</answer>", "images": ["a.png"]},
            {"solution": "<answer>4</answer>", "images": ["a.png"]},
            {"solution": "<answer>$0.5$</answer>", "images": []},
            {"solution": "<answer>7</answer>", "images": []}]
    res = rs(completions, rows)
    assert res.names == ["external_r1v_acc", "format"]
    assert res.rewards_per_func.tolist() == [[1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]
    assert res.weighted().tolist() == [2.0, 0.0, 2.0, 0.0]
    m = res.metrics()
    assert m["reward"] == 1.0 and m["rewards/external_r1v_acc/mean"] == 0.5


def test_plugin_importing_other_ms_swift_modules_says_what_is_provided(tmp_path):
    p = _plugin(tmp_path, "from swift.llm import InferRequest\n")
    with pytest.raises(ImportError, match=r"p\.py.*swift\.llm.*ORM, AsyncORM and orms"):
        load_external_plugins([p])
    assert "swift" not in sys.modules


def test_plugin_that_fails_names_the_file(tmp_path):
    with pytest.raises(RuntimeError, match=r"--external_plugins .*bad\.py: executing the file "
                                           r"failed: ZeroDivisionError"):
        load_external_plugins([_plugin(tmp_path, "x = 1 / 0\n", "bad.py")])
    with pytest.raises(FileNotFoundError, match="--external_plugins nope.py"):
        load_external_plugins(["nope.py"])


def test_columns_reach_functions_as_keyword_arguments(tmp_path):
    seen = {}

    class Spy(ORM):
        def __call__(self, completions, solution, **kwargs):
            seen.update(kwargs, solution=solution, args=self.args)
            return [float(len(c)) for c in completions]

    def narrow(completions, solution):  # no **kwargs: gets only what it names
        return [1.0 if c == s else 0.0 for c, s in zip(completions, solution)]

    R.register("spy", Spy, "test")
    R.register("narrow", narrow, "test")
    run_args = SimpleNamespace(max_completion_length=64, lr=1e-6)
    rs = build_rewards(RewardConfig(reward_funcs=["spy", "narrow"], reward_weights=[0.5, 2.0]),
                       args=run_args)
    res = rs(["ab", "c"], [{"solution": "ab", "level": 1}, {"solution": "x"}],
             response_token_ids=[[1, 2], [3]], trainer_state={"global_step": 3})
    assert seen["solution"] == ["ab", "x"] and seen["level"] == [1, None]
    assert seen["response_token_ids"] == [[1, 2], [3]]
    assert seen["trainer_state"] == {"global_step": 3} and seen["args"] is run_args
    assert res.rewards_per_func.tolist() == [[2.0, 1.0], [1.0, 0.0]]
    assert res.weighted().tolist() == [3.0, 0.5]
    with pytest.raises(ValueError, match="dataset column 'completions' clashes"):
        rs(["a"], [{"completions": 1}])
    with pytest.raises(ValueError, match="1 dataset rows for 2 completions"):
        rs(["a", "b"], [{}])


def test_async_orm(tmp_path):
    p = _plugin(tmp_path, "from swift.plugin import AsyncORM\n"
                "class Slow(AsyncORM):\n"
                "    async def __call__(self, completions, **kw):\n"
                "        return [0.25 for _ in completions]\n"
                "orms['slow'] = Slow\n")
    rs = build_rewards(RewardConfig(reward_funcs=["slow"], external_plugins=[p]))
    assert rs(["a", "b"]).rewards_per_func.flatten().tolist() == [0.25, 0.25]


BAD = {
    "raises": ("def f(completions, **kw):\n    raise KeyError('solution')\n",
               r"reward function 'f' \(.*bad_raises\.py: f\) raised KeyError: 'solution'"),
    "length": ("def f(completions, **kw):\n    return [1.0]\n",
               r"'f' .* returned 1 rewards for 3 completions"),
    "nan": ("def f(completions, **kw):\n    return [1.0, float('nan'), 0.0]\n",
            r"'f' .* returned nan for completion 1 \(return None for 'does not apply'\)"),
    "type": ("def f(completions, **kw):\n    return [1.0, 'yes', 0.0]\n",
             r"'f' .* returned 'yes' \(str\) for completion 1, not a number"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_reward_function_is_located_or_skipped(tmp_path, kind):
    body, msg = BAD[kind]
    p = _plugin(tmp_path, body + "orms['f'] = f\n", f"bad_{kind}.py")
    cfg = RewardConfig(reward_funcs=["f", "format"], external_plugins=[p])
    rs = build_rewards(cfg)
    with pytest.raises(RewardFunctionError, match=msg + r".*--on_reward_error skip"):
        rs(["a", GOOD, "c"])
    rs.on_reward_error = "skip"
    res = rs(["a", GOOD, "c"])
    want = {"raises": 3, "length": 3, "nan": 1, "type": 1}[kind]
    assert res.skipped == {"f": want}
    assert res.metrics()["rewards/f/skipped"] == want
    col = res.rewards_per_func[:, 0]
    assert int(torch.isnan(col).sum()) == want
    assert res.rewards_per_func[:, 1].tolist() == [0.0, 1.0, 0.0]  # the other function ran


def test_none_means_not_scored_and_is_no_error():
    R.register("picky", lambda completions, **kw: [None, 1.0], "test")
    res = build_rewards(RewardConfig(reward_funcs=["picky"]))(["a", "b"])
    assert math.isnan(res.rewards_per_func[0, 0]) and res.skipped == {}
    assert math.isnan(res.weighted()[0])  # unscorable: the advantage code gives it 0


def test_accuracy_builtin():
    acc = R.MathAccuracy()
    sols = ["<answer>\\frac{1}{2}</answer>", "$3$", "0.5", "not math at all ###", "$3$"]
    outs = ["<think>x</think><answer>0.5</answer>", "so it is \\boxed{3}", "I think 0.5",
            "<answer>1</answer>", "<answer>4</answer>"]
    # untagged prose without LaTeX is not extracted (ms-swift's config); unparseable gold: 0
    assert acc(outs, solution=sols) == [1.0, 1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="reward 'accuracy' needs .*'solution'"):
        acc(outs)


def test_format_builtin():
    f = R.Format()
    cases = {GOOD: 1.0, "<think>a</think><answer>b</answer>": 1.0,
             "<think>a\nb</think>  \n<answer>c\nd</answer>": 1.0,
             " <think>a</think><answer>b</answer>": 0.0,
             "<think>a</think><answer>b</answer>\n": 0.0,
             "<think>a</think>text<answer>b</answer>": 0.0, "<answer>b</answer>": 0.0}
    assert f(list(cases)) == list(cases.values())
    # ms-swift's pattern, as its Format ORM applies it, agrees on every case
    import re

    swift = r"^<think>.*?</think>\s*<answer>.*?</answer>(?![\s\S])"
    assert [1.0 if re.match(swift, c, re.DOTALL | re.MULTILINE) else 0.0 for c in cases] \
        == list(cases.values())


def test_cosine_builtin_follows_its_flags():
    cfg = RewardConfig(max_completion_length=100, cosine_min_len_value_correct=1.0,
                       cosine_max_len_value_correct=0.5, cosine_min_len_value_wrong=-0.5,
                       cosine_max_len_value_wrong=0.0)
    cos = R.CosineReward(cfg)
    comps = ["<answer>2</answer>"] * 4 + ["<answer>3</answer>"] * 3
    lens = [0, 50, 100, 150, 0, 50, 100]
    got = cos(comps, solution=["2"] * 7, response_token_ids=[[0] * n for n in lens])
    want = [1.0, 0.75, 0.5, 0.5, -0.5, -0.25, 0.0]
    assert all(abs(a - b) < 1e-12 for a, b in zip(got, want)), got
    # the paper's curve at a quarter: max + (min - max) * (1 + cos(pi/4)) / 2
    q = cos(["<answer>2</answer>"], solution=["2"], response_token_ids=[[0] * 25])[0]
    assert abs(q - (0.5 + 0.5 * (1 + math.cos(math.pi / 4)) / 2)) < 1e-12
    assert R.CosineReward(RewardConfig(max_completion_length=100, cosine_max_len=50))(
        ["<answer>2</answer>"], solution=["2"], response_token_ids=[[0] * 50])[0] == 0.5
    with pytest.raises(ValueError, match="'response_token_ids'"):
        cos(["x"], solution=["1"])


def test_repetition_builtin():
    rep = R.RepetitionPenalty(RewardConfig(repetition_n_grams=2, repetition_max_penalty=-2.0))
    # "a b a b a b": 2-grams ab ba ab ba ab -> 2 distinct of 5 -> (1 - 2/5) * -2 = -1.2
    got = rep(["a b a b a b", "A b c d", "", "one"])
    assert got == pytest.approx([-1.2, 0.0, 0.0, 0.0], abs=1e-12)


def test_soft_overlong_builtin():
    cfg = RewardConfig(reward_funcs=["soft_overlong"], max_completion_length=100,
                       soft_cache_length=20)
    so = R.SoftOverlong(cfg)
    got = so(["x"] * 5, response_token_ids=[[0] * n for n in (10, 80, 90, 100, 130)])
    assert got == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])
    with pytest.raises(ValueError, match="needs --soft_cache_length"):
        RewardConfig(reward_funcs=["soft_overlong"])
    with pytest.raises(ValueError, match="--soft_cache_length 100 must be > 0 and < "
                                         "--soft_max_length 100"):
        RewardConfig(reward_funcs=["soft_overlong"], max_completion_length=100,
                     soft_cache_length=100)


def test_builtins_read_flags_from_a_run_namespace():
    ns = SimpleNamespace(repetition_n_grams=1, repetition_max_penalty=-1.0, lr=1.0)
    rs = build_rewards(RewardConfig(reward_funcs=["repetition"], repetition_n_grams=1), args=ns)
    assert rs(["a a"]).rewards_per_func.item() == -0.5  # the built-in saw n = 1
    assert R.RepetitionPenalty(ns)(["a a"]) == [-0.5]


def test_registry_errors_name_the_flag(guide_plugin):
    with pytest.raises(ValueError, match=r"--reward_funcs external_r1v_acc: no such reward "
                                         r"function.*Built-in: accuracy, cosine, format.*"
                                         r"--external_plugins"):
        build_rewards(RewardConfig(reward_funcs=["external_r1v_acc"]))
    with pytest.raises(ValueError, match=r"--reward_weights has 1 values for 2 reward functions "
                                         r"\(external_r1v_acc, format\)"):
        build_rewards(RewardConfig(reward_funcs=["external_r1v_acc", "format"],
                                   reward_weights=[1.0], external_plugins=[str(guide_plugin)]))
    with pytest.raises(ValueError, match="GRPO needs a reward"):
        build_rewards(RewardConfig())
    with pytest.raises(ValueError, match="--on_reward_error 'ignore'"):
        RewardConfig(on_reward_error="ignore")
