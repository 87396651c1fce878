"""Rewards reach the right answer: each answer is scored against its own prompt, thought and example, the
tree pairs every answer with the thought it continues, and the answer and format patterns reject near
misses. Each test name states the property it checks."""

import random

import pytest
import torch

import grpo_ma as G

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return G.build_char_tokenizer()


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


def test_sample_tree_pairs_every_answer_with_the_thought_it_continues(tokenizer, monkeypatch):
    """sample_continuations replaced by a stand-in whose continuations name the prefix they continue and their
    copy index; thoughts of copy 1 end by eos (kept: it is trained on, then closed by force), the others close
    themselves."""
    close = tokenizer.encode(G.THINK_CLOSE, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    digit = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    calls = []

    def labelled_continuations(model, tok, prefixes, n, budget, stop, cfg, do_sample, vision=None):
        calls.append([list(prefix) for prefix in prefixes])
        out = []
        for i, _ in enumerate(prefixes):
            for j in range(n):
                if stop == G.THINK_CLOSE:
                    out.append(
                        ([digit[i], digit[j], eos], "eos")
                        if j == 1
                        else ([digit[i], digit[j], *close], "stop")
                    )
                else:
                    out.append(([digit[i], digit[j]], "budget"))
        return out

    monkeypatch.setattr(G, "sample_continuations", labelled_continuations)
    prompt_ids = [[digit[5], digit[5]], [digit[6]], [digit[7], digit[8], digit[9]]]
    tree = G.sample_tree(torch.nn.Linear(1, 1), tokenizer, prompt_ids, 3, 2, G.Config())
    assert calls[0] == prompt_ids
    for p in range(3):
        for k in range(3):
            assert tree.thought_ids[p][k] == [digit[p], digit[k]] + ([eos] if k == 1 else close)
            assert tree.forced_close[p][k] == (close if k == 1 else [])
            assert tree.thoughts[p][k] == f"{p}{k}{G.THINK_CLOSE}"
            prefix = prompt_ids[p] + [digit[p], digit[k]] + ([eos] if k == 1 else []) + close
            for m in range(2):
                i, j = tree.answer_ids[p][k][m]  # the index of the prefix it continued, and its copy
                assert calls[1][digit.index(i)] == prefix and digit.index(j) == m
                assert tree.answers[p][k][m] == tokenizer.decode(tree.answer_ids[p][k][m])
    assert len(calls[1]) == 9


def test_greedy_tree_continues_each_prompt_and_each_thought(tokenizer):
    """With greedy decoding, every thought is what generate() writes after its own prompt alone, and every
    answer what it writes after that prompt and thought alone."""
    torch.manual_seed(3)
    model = G.build_embedded_model(tokenizer).eval()
    with torch.no_grad():  # larger weights than the init's: outputs that depend on the context
        for weight in model.parameters():
            if weight.dim() > 1:
                weight.normal_(0, 0.2)
    cfg = G.Config(max_thought_tokens=6, max_answer_tokens=4)
    prompt_ids = [
        tokenizer.encode(q + "=?" + G.THINK_OPEN, add_special_tokens=False) for q in ("7+3", "12-4-1")
    ]
    tree = G.sample_tree(model, tokenizer, prompt_ids, 2, 2, cfg, do_sample=False)

    def greedy(prefix, budget):
        settings = dict(do_sample=False, temperature=None, top_k=None, top_p=None, max_new_tokens=budget)
        out = model.generate(
            input_ids=torch.tensor([prefix]), pad_token_id=tokenizer.pad_token_id, **settings
        )
        return out[0, len(prefix) :].tolist()

    for p, k in tree.thought_slots():
        written = greedy(prompt_ids[p], cfg.max_thought_tokens)
        sampled = tree.thought_ids[p][k]
        assert written[: len(sampled)] == sampled
        prefix = tree.prefix(p, k)
        assert prefix == prompt_ids[p] + sampled + tree.forced_close[p][k]
        for m in range(2):
            answer = tree.answer_ids[p][k][m]
            assert greedy(prefix, cfg.max_answer_tokens)[: len(answer)] == answer
    assert tree.thought_ids[0][0] != tree.thought_ids[1][0]  # the prompts do lead to different thoughts


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


def test_reward_weights_scale_each_function_in_the_total():
    cfg = G.Config(reward="accuracy,format", reward_weights="2,0.5")
    fns = G.reward_functions(cfg)
    tree = labelled_tree(1, 2, 1)
    tree.answers = [[["<answer>4</answer>"], ["<answer>3</answer>"]]]
    scores = G.score_answers(fns, tree, [G.Example("1+3", "", [], "4")], [""])
    assert scores["total"].tolist() == [[[2.0 + 0.5], [0.5]]]


def test_seeded_examples_differ_by_prompt():
    """The end-to-end tests rely on prompts of one step being different problems."""
    examples = G.sample_examples(random.Random(0), "addsub", 8, held_out=False)
    assert len({e.question for e in examples}) == 8
