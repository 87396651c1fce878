"""Tests of demos/common.py, what the GPU recipes share, where the recipes' own tests do not reach: how a
JSONL file is read line by line, the held-out slice and the pool-size check at their edges, and the order of
the shared command line."""

import re

import pytest

import grpo_ma as G
import grpo_ma_run as R
from demos import common


def test_jsonl_lines_skip_blanks_name_the_place_as_spelled_and_stop_at_the_limit(tmp_path, monkeypatch):
    (tmp_path / "d.jsonl").write_text('{"a": 1}\n\n   \n{"a": 2}\n{not json\n')
    monkeypatch.chdir(tmp_path)
    lines = list(common.jsonl_lines("./d.jsonl"))
    assert [where for where, _ in lines] == ["./d.jsonl:1", "./d.jsonl:4", "./d.jsonl:5"]
    # blank lines do not count toward the limit, and what lies past it is never read (so never rejected)
    limited = [common.parse_json_line(line, where) for where, line in common.jsonl_lines("./d.jsonl", 2)]
    assert limited == [{"a": 1}, {"a": 2}]
    assert list(common.jsonl_lines("./d.jsonl", 0)) == []
    where, line = lines[2]
    with pytest.raises(ValueError, match=re.escape("./d.jsonl:5: not JSON (")):
        common.parse_json_line(line, where)


def test_hold_out_tail_keeps_at_least_one_record_on_each_side():
    assert common.hold_out_tail(list(range(10)), 0.25, "d") == (list(range(8)), [8, 9])  # round(2.5) = 2
    assert common.hold_out_tail([1, 2, 3], 0.01, "d") == ([1, 2], [3])  # never an empty held-out set
    with pytest.raises(
        ValueError, match=re.escape("d.jsonl: 1 records leave none to train on after holding")
    ):
        common.hold_out_tail([1], 0.1, "d.jsonl")


def test_a_pool_needs_a_warm_up_batch_only_when_there_is_a_warm_up():
    no_warmup = G.Config(prompts_per_step=2, warmup_steps=0, warmup_batch=8)
    common.require_enough_for_a_step(no_warmup, 2, 1, "examples")
    with pytest.raises(ValueError, match=re.escape("2 training and 1 held-out records: need at least 8")):
        warmup = G.Config(prompts_per_step=2, warmup_steps=1, warmup_batch=8)
        common.require_enough_for_a_step(warmup, 2, 1, "records")
    with pytest.raises(ValueError, match="and 1$"):
        common.require_enough_for_a_step(no_warmup, 5, 0, "examples")


def test_parser_puts_the_recipe_flags_first_and_split_flags_hands_back_both_parts():
    def add_own(group):
        group.add_argument("--data", default="d.jsonl", help="the data file")

    parser = common.build_parser("prog", "First line.\nMore.", "data (test)", add_own, {"steps": 7})
    usage = parser.format_usage()
    assert parser.description == "First line."
    assert usage.index("--data") < usage.index("--steps") < usage.index("--save-every")
    titles = [group.title for group in parser._action_groups]
    assert titles.index("data (test)") + 1 == titles.index(common.CONFIG_GROUP)
    cfg, own = common.split_flags(vars(parser.parse_args(["--save-every", "3", "--debug"])))
    assert type(cfg) is R.RunConfig and (cfg.steps, cfg.save_every) == (7, 3)
    assert vars(own) == {"data": "d.jsonl", "debug": True}
