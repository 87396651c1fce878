"""Rewards reach the right answer: each answer is scored against its own prompt, thought and example, the
reward weights scale each function in the total, the answer and format patterns reject near misses, and a
reward function that gives NaN or too few values is named in the error. Each test name states the property it
checks."""

import random

import pytest
import torch
from conftest import digit_tree

import grpo_ma as G

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def labelled_tree(prompts, k, m):
    """A tree whose texts name their place: thought "t{p}{k}", answer "a{p}{k}{m}". P, K and M all differ,
    so a slot read from the wrong axis, or tiled instead of repeated, lands on another label."""
    thought_ids = [[[1] for _ in range(k)] for _ in range(prompts)]
    answer_ids = [[[[1] for _ in range(m)] for _ in range(k)] for _ in range(prompts)]
    forced = [[[] for _ in range(k)] for _ in range(prompts)]
    thoughts = [[f"t{p}{j}" for j in range(k)] for p in range(prompts)]
    answers = [[[f"a{p}{j}{i}" for i in range(m)] for j in range(k)] for p in range(prompts)]
    return G.Tree([[1] for _ in range(prompts)], thought_ids, forced, answer_ids, thoughts, answers)


def place_if_consistent(prompts, thoughts, answers, examples):
    """100p + 10k + m + 1 of an answer whose prompt, thought and example belong to its own slot, else -1."""
    values = []
    for prompt, thought, answer, example in zip(prompts, thoughts, answers, examples):
        p, k, m = (int(c) for c in answer[1:])
        consistent = prompt == f"prompt {p}" and thought == f"t{p}{k}" and example.question == f"q{p}"
        values.append(100 * p + 10 * k + m + 1 if consistent else -1)
    return values


def prompt_digit(prompts, thoughts, answers, examples):
    return [float(prompt[-1]) for prompt in prompts]


def test_each_answer_is_scored_with_its_own_prompt_thought_and_example():
    tree = labelled_tree(3, 2, 4)
    examples = [G.Example(f"q{p}", "", [], str(p)) for p in range(3)]
    prompts = [f"prompt {p}" for p in range(3)]
    fns = [(place_if_consistent, 1.0), (prompt_digit, 1000.0)]
    scores = G.score_answers(fns, tree, examples, prompts)
    place = torch.tensor(
        [[[100.0 * p + 10 * k + m + 1 for m in range(4)] for k in range(2)] for p in range(3)]
    )
    assert torch.equal(scores["reward/place_if_consistent"], place)
    digit = torch.tensor([[[float(p)] * 4] * 2 for p in range(3)])
    assert torch.equal(scores["reward/prompt_digit"], digit)
    assert torch.equal(scores["total"], place + 1000 * digit)  # the weighted sum
    assert scores["total"].dtype == torch.float32


def test_accuracy_compares_each_answer_with_its_own_prompts_answer():
    tree = labelled_tree(3, 2, 2)
    examples = [G.Example(f"q{p}", "", [], str(7 * p + 1)) for p in range(3)]
    tree.answers = [[[f"<answer>{7 * p + 1}</answer>" for _ in range(2)] for _ in range(2)] for p in range(3)]
    tree.answers[2][1][0] = "<answer>1</answer>"  # prompt 0's answer, given to prompt 2
    scores = G.score_answers([(G.accuracy, 1.0)], tree, examples, ["", "", ""])
    expected = torch.ones(3, 2, 2)
    expected[2, 1, 0] = 0
    assert torch.equal(scores["reward/accuracy"], expected)


def test_reward_weights_scale_each_function_in_the_total():
    cfg = G.Config(reward="accuracy,format", reward_weights="2,0.5")
    fns = G.reward_functions(cfg)
    tree = labelled_tree(1, 2, 1)
    tree.answers = [[["<answer>4</answer>"], ["<answer>3</answer>"]]]
    scores = G.score_answers(fns, tree, [G.Example("1+3", "", [], "4")], [""])
    assert scores["total"].tolist() == [[[2.0 + 0.5], [0.5]]]


# ------------------------------------------------------------------------------------------------
# the answer and format patterns
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "answer, number",
    [
        ("<answer>18</answer>", "18"),
        ("<answer>-18</answer>", "-18"),
        ("<answer> 18 </answer>", "18"),
        ("<answer>18", "18"),  # an unclosed answer is read as it stands
        ("so <answer>18</answer>", "18"),
        ("<answer>18.5</answer>", None),
        ("<answer>18x</answer>", None),
        ("<answer>18 19</answer>", None),
        ("<answer>18.5", None),
        ("<answer></answer>", None),
        ("18", None),
        ("<answer>x18</answer>", None),
    ],
)
def test_answer_must_fill_the_answer_block(answer, number):
    assert G.extract_answer(answer) == number
    example = G.Example("9+9", "", [], "18")
    assert G.answer_is_correct(answer, example) == (number == "18")
    assert G.accuracy([""], [""], [answer], [example]) == [float(number == "18")]


@pytest.mark.parametrize(
    "answer, formatted",
    [
        ("<answer>5</answer>", True),
        ("<answer>-12</answer>", True),
        ("  <answer>5</answer>\n", True),  # surrounding whitespace is not junk
        ("x<answer>5</answer>", False),
        ("<answer>5</answer>x", False),
        ("<answer>5</answer><answer>6</answer>", False),
        ("<answer>5</answer></answer>", False),
        ("<answer>5", False),
        ("<answer></answer>", False),
        ("<answer>5.5</answer>", False),
        ("<answer> 5</answer>", False),
        ("<answer>a</answer>", False),
        ("5", False),
    ],
)
def test_format_reward_accepts_exactly_one_closed_number_block(answer, formatted):
    assert G.format_reward([""], [""], [answer], [G.Example("", "", [], "5")]) == [float(formatted)]


# ------------------------------------------------------------------------------------------------
# a reward function that misbehaves is named
# ------------------------------------------------------------------------------------------------
def nan_reward(prompts, thoughts, answers, examples):
    return [float("nan")] * len(answers)


def short_reward(prompts, thoughts, answers, examples):
    return [1.0] * (len(answers) - 1)


@pytest.mark.parametrize(
    "fn, message",
    [(nan_reward, "'nan_reward' gave nan"), (short_reward, "'short_reward' gave 3 values for 4")],
)
def test_bad_reward_function_is_named_in_the_error(tokenizer, fn, message):
    tree = digit_tree(tokenizer, 2, 2, 1)
    tree.answers = [[["<answer>1</answer>"] for _ in range(2)] for _ in range(2)]
    examples = [G.make_example(random.Random(0), "addsub")] * 2
    with pytest.raises(ValueError, match=message):
        G.score_answers([(fn, 1.0)], tree, examples, ["", ""])
