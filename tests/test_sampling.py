"""Two-stage sampling: the shared-prefix cache samples what generate() samples on the full prefixes (tokens
and logits, greedy and sampled), a continuation is cut at the token that completes its stop marker, a thought
that never closes is closed by force, and the tree pairs every answer with the prompt and thought it
continues."""

import pytest
import torch
from conftest import prefix, sample_continuations
from hypothesis import given
from hypothesis import strategies as st

import grpo_ma as G

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def plain_generate(model, tokenizer, prefixes, n, budget, stop, temperature, do_sample):
    """What generate() samples on the full prefixes, each repeated n times, without any cache given to it."""
    rows = [prefix for prefix in prefixes for _ in range(n)]
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    if do_sample:
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        sampling = dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=budget,
        stop_strings=[stop],
        tokenizer=tokenizer,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        output_logits=True,
        return_dict_in_generate=True,
        **sampling,
    )
    continuations = [G.cut_at_stop(row, tokenizer, stop) for row in out.sequences[:, width:].tolist()]
    return continuations, torch.stack(out.logits, 1)


@pytest.mark.parametrize("do_sample", [False, True])
@pytest.mark.parametrize(
    "texts",
    [("7+3-2=?<think>1:7+3=10;</think>", "12+3=?<think>1:1", "9-1+1=?<think>"), ("7", "=")],
    ids=["shared-prefix-cache", "one-token-prefixes"],
)
def test_kv_reuse_samples_what_generate_samples_on_the_full_prefixes(
    tokenizer, tiny_model, monkeypatch, do_sample, texts
):
    cfg = G.Config(temperature=0.8)
    prefixes = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    budget, stop, n = 6, G.ANSWER_CLOSE, 3
    torch.manual_seed(7)
    expected, expected_logits = plain_generate(
        tiny_model, tokenizer, prefixes, n, budget, stop, 0.8, do_sample
    )

    captured = []
    real_generate = tiny_model.generate

    def generate_keeping_logits(**kwargs):
        out = real_generate(**kwargs, output_logits=True, return_dict_in_generate=True)
        captured.append(torch.stack(out.logits, 1))
        return out.sequences

    monkeypatch.setattr(tiny_model, "generate", generate_keeping_logits)
    torch.manual_seed(7)
    got = sample_continuations(tiny_model, tokenizer, prefixes, n, budget, stop, cfg, do_sample)
    assert got == expected
    assert captured[0].shape == expected_logits.shape
    torch.testing.assert_close(
        torch.log_softmax(captured[0], -1), torch.log_softmax(expected_logits, -1), rtol=0, atol=1e-4
    )


def test_thought_that_never_closes_is_closed_by_force(tokenizer, tiny_model):
    cfg = G.Config(max_thought_tokens=2, max_answer_tokens=3)
    prompts = [tokenizer.encode(q + "=?" + G.THINK_OPEN, add_special_tokens=False) for q in ("7+3-2", "4+4")]
    torch.manual_seed(0)
    tree = G.sample_tree(tiny_model, tokenizer, prompts, 3, 2, cfg)
    close = tokenizer.encode(G.THINK_CLOSE, add_special_tokens=False)
    forced = 0
    for p, k in tree.thought_slots():
        sampled = tree.thought_ids[p][k]
        assert len(sampled) <= 2 and tokenizer.eos_token_id not in sampled
        closed_itself = tokenizer.decode(sampled).endswith(G.THINK_CLOSE)
        assert tree.forced_close[p][k] == ([] if closed_itself else close)
        assert tree.thoughts[p][k].endswith(G.THINK_CLOSE)
        forced += not closed_itself
    assert forced > 0
    assert [[len(by_k) for by_k in by_p] for by_p in tree.answers] == [[2, 2, 2], [2, 2, 2]]


def test_cut_at_stop_keeps_the_token_that_completes_the_marker(tokenizer):
    ids = tokenizer.encode("1:2+3=5;</think>99", add_special_tokens=False)
    kept, ended = G.cut_at_stop(ids, tokenizer, G.THINK_CLOSE)
    assert ended == "stop" and tokenizer.decode(kept) == "1:2+3=5;</think>"
    kept, ended = G.cut_at_stop(ids[:3] + [tokenizer.eos_token_id] + ids[3:], tokenizer, G.THINK_CLOSE)
    assert ended == "eos" and kept[-1] == tokenizer.eos_token_id and len(kept) == 4
    kept, ended = G.cut_at_stop(ids[:5], tokenizer, G.THINK_CLOSE)
    assert ended == "budget" and kept == ids[:5]
    twice = tokenizer.encode("1;</answer>", add_special_tokens=False)
    assert G.cut_at_stop(twice + twice, tokenizer, G.ANSWER_CLOSE) == (twice, "stop")  # at the first one


# ------------------------------------------------------------------------------------------------
# the tree: every answer continues its own prompt and thought
# ------------------------------------------------------------------------------------------------
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
        context = prefix(tree, p, k)
        assert context == prompt_ids[p] + sampled + tree.forced_close[p][k]
        for m in range(2):
            answer = tree.answer_ids[p][k][m]
            assert greedy(context, cfg.max_answer_tokens)[: len(answer)] == answer
    assert tree.thought_ids[0][0] != tree.thought_ids[1][0]  # the prompts do lead to different thoughts


def cut_one_prefix_at_a_time(ids, tokenizer, stop):
    """The definition, checked prefix by prefix: the first end at which the text holds `stop`, or eos is the
    last token."""
    for end in range(1, len(ids) + 1):
        if stop in tokenizer.decode(ids[:end]):
            return ids[:end], "stop"
        if ids[end - 1] == tokenizer.eos_token_id:
            return ids[:end], "eos"
    return ids, "budget"


CHAR_TOKENIZER = G.build_char_tokenizer()
PIECES = [CHAR_TOKENIZER.encode(text, add_special_tokens=False) for text in ("1", ";", "<", "/", "answer>")]
PIECES += [[CHAR_TOKENIZER.eos_token_id], [CHAR_TOKENIZER.convert_tokens_to_ids(G.THINK_CLOSE)]]
PIECES += [
    CHAR_TOKENIZER.encode(text, add_special_tokens=False) for text in ("</", "think", ">", "</answer>")
]


@given(
    pieces=st.lists(st.sampled_from(PIECES), max_size=20),
    stop=st.sampled_from([G.THINK_CLOSE, G.ANSWER_CLOSE, "1;", "</answer"]),
)
def test_cut_at_stop_cuts_where_the_first_prefix_holds_the_marker(pieces, stop):
    """The bisection finds what a scan of every prefix finds, for markers of one token and of several, spelt
    by one token or by pieces, with eos before, after or between them."""
    ids = [token for piece in pieces for token in piece]
    assert G.cut_at_stop(ids, CHAR_TOKENIZER, stop) == cut_one_prefix_at_a_time(ids, CHAR_TOKENIZER, stop)
