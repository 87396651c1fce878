"""Stage 2 continues stage 1's KV cache: the answers sampled after each thought's cached rows (ended rows
masked, their last token fed again with the forced close) are token for token those of re-encoding every
prompt + thought (+ forced </think>), kept here as the reference, greedy and sampled, for the embedded model
and for a vision-language Qwen2-VL (M-RoPE). And the stop check compares token ids instead of matching
text."""

import dataclasses
import random
from collections import Counter

import pytest
import torch
from conftest import compiled_with, prefix, sample_continuations, tiny_counting_vlm

import grpo_ma as G

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------
# the reference: sampling as it was, every answer prefix left-padded and read again
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def reencoding_continuations(model, tokenizer, prefixes, n, budget, stop, cfg, do_sample, vision=None):
    """grpo_ma.sample_continuations before the change: text stop strings for a marker of several tokens."""
    from transformers import DynamicCache

    ids, mask = G.left_pad(prefixes, tokenizer.pad_token_id, model.device)
    if do_sample:
        kwargs = dict(do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0)
    else:
        kwargs = dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    kwargs |= dict(max_new_tokens=budget, repetition_penalty=1.0, pad_token_id=tokenizer.pad_token_id)
    stop_ids = tokenizer.encode(stop, add_special_tokens=False)
    if len(stop_ids) == 1:
        kwargs["eos_token_id"] = [tokenizer.eos_token_id, *stop_ids]
    else:
        kwargs |= dict(eos_token_id=tokenizer.eos_token_id, stop_strings=[stop], tokenizer=tokenizer)
    markers = [getattr(model.config, f"{name}_token_id", None) for name in G.VISION_MARKERS]
    kwargs["suppress_tokens"] = [token for token in markers if token is not None]
    if ids.shape[1] > 1:
        kwargs["cache"] = DynamicCache(config=model.config)
        inputs = G.model_inputs(model, ids[:, :-1], mask[:, :-1], vision)
        model(**inputs, cache=kwargs["cache"], use_cache=True, logits_to_keep=1)
        kwargs["cache"].batch_repeat_interleave(n)
        for module in model.modules():
            if getattr(module, "rope_deltas", None) is not None:
                module.rope_deltas = module.rope_deltas.repeat_interleave(n, dim=0)
    ids, mask = ids.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0)
    new = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1] :]
    return [G.cut_at_stop(row, tokenizer, stop) for row in new.tolist()]


def reencoding_tree(model, tokenizer, prompt_ids, k, m, cfg, do_sample=True, vision=None):
    """grpo_ma.sample_tree before the change: stage 2 left-pads and prefills every prompt + thought again."""
    model.eval()
    close = tokenizer.encode(G.THINK_CLOSE, add_special_tokens=False)
    thoughts = reencoding_continuations(
        model, tokenizer, prompt_ids, k, cfg.max_thought_tokens, G.THINK_CLOSE, cfg, do_sample, vision
    )
    sampled = [ids for ids, _ in thoughts]
    forced = [[] if ended == "stop" else close for _, ended in thoughts]
    tree = G.Tree(prompt_ids, G.group_rows(sampled, k), G.group_rows(forced, k), [], [], [], [], vision or [])
    prefixes = [prefix(tree, p, j) for p, j in tree.thought_slots()]
    rows = [tree.vision[p] for p, _ in tree.thought_slots()] if tree.vision else None
    answers = reencoding_continuations(
        model, tokenizer, prefixes, m, cfg.max_answer_tokens, G.ANSWER_CLOSE, cfg, do_sample, rows
    )
    tree.answer_ids = G.group_rows(G.group_rows([ids for ids, _ in answers], m), k)
    tree.answer_ended = G.group_rows(G.group_rows([ended for _, ended in answers], m), k)
    texts = tokenizer.batch_decode([s + f for s, f in zip(sampled, forced)], skip_special_tokens=True)
    tree.thoughts = G.group_rows(texts, k)
    texts = tokenizer.batch_decode([ids for ids, _ in answers], skip_special_tokens=True)
    tree.answers = G.group_rows(G.group_rows(texts, m), k)
    return tree


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
TREE_FIELDS = ("thought_ids", "forced_close", "answer_ids", "answer_ended", "thoughts", "answers")


def recorded_logits(model, monkeypatch) -> list:
    """Make model.generate record each call's logits (rows, new tokens, V) in the list returned."""
    real_generate = model.generate
    calls = []

    def generate_and_record(**kwargs):
        out = real_generate(**kwargs, output_logits=True, return_dict_in_generate=True)
        calls.append(torch.stack(out.logits, 1))
        return out.sequences

    monkeypatch.setattr(model, "generate", generate_and_record)
    return calls


def both_trees(model, tokenizer, prompt_ids, k, m, cfg, do_sample, monkeypatch, vision=None, seed=0):
    """The cached tree and the re-encoding one from the same seed, and each one's logits per generate call."""
    with monkeypatch.context() as patch:
        calls = recorded_logits(model, patch)
        torch.manual_seed(seed)
        got = G.sample_tree(model, tokenizer, prompt_ids, k, m, cfg, do_sample, vision)
        got_logits = list(calls)
        calls.clear()
        torch.manual_seed(seed)
        expected = reencoding_tree(model, tokenizer, prompt_ids, k, m, cfg, do_sample, vision)
    return got, expected, got_logits, list(calls)


def assert_same_tree(got, expected, got_logits, expected_logits):
    """Same tokens, texts and endings; and every sampled step's log-probs within float rounding (a wrong
    position or an unmasked column would move them even where the argmax does not move)."""
    for name in TREE_FIELDS:
        assert getattr(got, name) == getattr(expected, name), name
    for got_step, expected_step in zip(got_logits, expected_logits):
        assert got_step.shape == expected_step.shape
        torch.testing.assert_close(
            torch.log_softmax(got_step, -1), torch.log_softmax(expected_step, -1), rtol=0, atol=1e-4
        )


def endings(tree) -> tuple[Counter, Counter]:
    """How the thoughts ended ('stop', or 'forced': eos or budget) and how the answers did."""
    thoughts = Counter("forced" if tree.forced_close[p][k] else "stop" for p, k in tree.thought_slots())
    answers = Counter(tree.answer_ended[p][k][m] for p, k, m in tree.answer_slots())
    return thoughts, answers


def prefer_after(model, token: int, preferred: int):
    """A forward hook making `preferred` the likeliest next token wherever the model was fed `token`: thoughts
    then close (or end by eos) at steps that depend on what they wrote."""

    def prefer(module, args, kwargs, output):
        fed = kwargs["input_ids"][:, -output.logits.shape[1] :]
        output.logits[..., preferred] += 30.0 * (fed == token)
        return output

    return model.register_forward_hook(prefer, with_kwargs=True)


# ------------------------------------------------------------------------------------------------
# the embedded model, warmed up so that it closes its thoughts and answers at different steps
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def warm(one_torch_thread):
    """The embedded model after 40 warm-up steps (it writes the format), and six held-out prompts."""
    cfg = G.Config(warmup_steps=40)
    run = G.start_run(cfg)
    G.supervised_warmup(run, cfg)
    examples = G.sample_examples(random.Random(5), "addsub", 6, held_out=True)
    _, prompt_ids, _ = G.encode_prompts(run.tokenizer, examples)
    return run.policy.eval(), run.tokenizer, prompt_ids


@pytest.mark.parametrize(("k", "m"), [(2, 2), (2, 3)], ids=["M=2", "M=3"])
@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_answers_continued_from_the_thought_cache_equal_answers_from_re_encoded_prefixes(
    warm, monkeypatch, k, m, do_sample
):
    """Thoughts that closed themselves at different steps (masked holes after them) and thoughts closed by
    force (budget); the same seed draws the same tokens on both paths. A hook closes a thought after its first
    "2", else the warmed-up model closes every greedy thought at the same step."""
    model, tokenizer, prompt_ids = warm
    cfg = G.Config(max_thought_tokens=8, max_answer_tokens=3, temperature=1.0)
    hook = prefer_after(
        model, tokenizer.convert_tokens_to_ids("2"), tokenizer.convert_tokens_to_ids(G.THINK_CLOSE)
    )
    try:
        got, expected, got_logits, expected_logits = both_trees(
            model, tokenizer, prompt_ids, k, m, cfg, do_sample, monkeypatch
        )
    finally:
        hook.remove()
    assert_same_tree(got, expected, got_logits, expected_logits)
    thoughts, answers = endings(got)
    assert thoughts["stop"] and thoughts["forced"] and answers["stop"]
    assert len({len(got.thought_ids[p][j]) for p, j in got.thought_slots()}) > 1


def test_thoughts_ended_by_eos_continue_after_their_eos_and_forced_close(warm, monkeypatch):
    model, tokenizer, prompt_ids = warm
    cfg = G.Config(max_thought_tokens=16, max_answer_tokens=5)
    hook = prefer_after(model, tokenizer.convert_tokens_to_ids("7"), tokenizer.eos_token_id)
    try:
        got, expected, got_logits, expected_logits = both_trees(
            model, tokenizer, prompt_ids, 2, 2, cfg, False, monkeypatch
        )
    finally:
        hook.remove()
    assert_same_tree(got, expected, got_logits, expected_logits)
    eos = tokenizer.eos_token_id
    assert any(got.thought_ids[p][k][-1:] == [eos] for p, k in got.thought_slots())
    assert any(got.forced_close[p][k] == [] for p, k in got.thought_slots())


def test_one_token_prompts_and_one_token_budgets_continue_the_cache(tiny_model, tokenizer, monkeypatch):
    """The edges of the cache: prompts of one token (nothing prefilled before generate), thoughts of one token
    (every last thought token outside the cache), answers of one token."""
    prompts = [tokenizer.encode(text, add_special_tokens=False) for text in ("7", "=", "1")]
    cfg = G.Config(max_thought_tokens=1, max_answer_tokens=1)
    for do_sample in (False, True):
        got, expected, got_logits, expected_logits = both_trees(
            tiny_model, tokenizer, prompts, 2, 2, cfg, do_sample, monkeypatch
        )
        assert_same_tree(got, expected, got_logits, expected_logits)


# ------------------------------------------------------------------------------------------------
# M = 1: each answer follows its thought in the same generate() call
# ------------------------------------------------------------------------------------------------
def counted_reads(monkeypatch) -> list:
    """Make grpo_ma.read_prefixes note how many prefixes each call reads, in the list returned."""
    reads = []
    read_prefixes = G.read_prefixes

    def counting_read_prefixes(model, tokenizer, prefixes, vision=None):
        reads.append(len(prefixes))
        return read_prefixes(model, tokenizer, prefixes, vision)

    monkeypatch.setattr(G, "read_prefixes", counting_read_prefixes)
    return reads


@pytest.fixture(params=["</think>", "zq"], ids=["one-token close", "two-token close"])
def close_marker(request, monkeypatch, warm):
    """The thought marker: the embedded one token, or "zq" (two character tokens, written token by token
    when closed by force). Thoughts close after their first "2" and end by eos after their first "7"; the rest
    run to their budget. Yields the marker's ids."""
    model, tokenizer, _ = warm
    monkeypatch.setattr(G, "THINK_CLOSE", request.param)
    marker = tokenizer.encode(request.param, add_special_tokens=False)
    token = tokenizer.convert_tokens_to_ids
    hooks = [
        prefer_after(model, token("2"), marker[0]),
        prefer_after(model, token("7"), tokenizer.eos_token_id),
    ]
    hooks += [prefer_after(model, before, after) for before, after in zip(marker, marker[1:])]
    yield marker
    for hook in hooks:
        hook.remove()


def test_at_m1_greedy_trees_are_the_two_stage_trees_from_one_generate_call(warm, monkeypatch, close_marker):
    """Thoughts closed by themselves, by eos (kept, then closed by force) and by budget (closed by force):
    the same tokens, texts and endings as the two stages, from one generate() call that runs as many steps as
    its longest thought + close + answer, not its longest thought + its longest answer."""
    model, tokenizer, prompt_ids = warm
    cfg = G.Config(max_thought_tokens=10, max_answer_tokens=2)  # most answers end by budget
    got, expected, got_logits, expected_logits = both_trees(
        model, tokenizer, prompt_ids, 3, 1, cfg, False, monkeypatch
    )
    for name in TREE_FIELDS:
        assert getattr(got, name) == getattr(expected, name), name
    assert len(got_logits) == 1 and len(expected_logits) == 2
    rows = [
        got.thought_ids[p][k] + got.forced_close[p][k] + got.answer_ids[p][k][0]
        for p, k in got.thought_slots()
    ]
    assert got_logits[0].shape[1] == max(map(len, rows))  # forced close tokens are decode steps here
    thoughts, answers = endings(got)
    eos = tokenizer.eos_token_id
    assert thoughts["stop"] and thoughts["forced"] and answers["budget"]
    assert any(got.thought_ids[p][k][-1:] == [eos] for p, k in got.thought_slots())


def test_at_m1_every_sampled_token_is_drawn_from_its_own_rows_prefix(warm, monkeypatch, close_marker):
    """Seeded sampling: the thoughts are the two stages' draws (one draw per row per step in both), and every
    token of a row, thought, forced close and answer, is drawn from the logits a plain forward gives on the
    row's own prompt + tokens so far, with nothing padded or cached: the two stages' distribution."""
    model, tokenizer, prompt_ids = warm
    cfg = G.Config(max_thought_tokens=10, max_answer_tokens=4, temperature=1.0)
    got, expected, got_logits, _ = both_trees(model, tokenizer, prompt_ids, 3, 1, cfg, True, monkeypatch)
    for name in ("thought_ids", "forced_close"):
        assert getattr(got, name) == getattr(expected, name), name
    for row, (p, k) in enumerate(got.thought_slots()):
        tokens = got.thought_ids[p][k] + got.forced_close[p][k] + got.answer_ids[p][k][0]
        with torch.no_grad():
            ids = torch.tensor([prompt_ids[p] + tokens])
            logits = model(input_ids=ids).logits[0, len(prompt_ids[p]) - 1 : -1]
        torch.testing.assert_close(
            torch.log_softmax(got_logits[0][row, : len(tokens)], -1),
            torch.log_softmax(logits, -1),
            rtol=0,
            atol=1e-4,
        )
    thoughts, _ = endings(got)
    assert thoughts["stop"] and thoughts["forced"]


def test_at_m1_a_thought_cut_at_a_marker_spelt_by_other_tokens_gets_its_answer_after_the_cut(
    warm, monkeypatch
):
    """With the marker "think" (five character tokens), a thought that writes the one token </think> holds
    it in its text, so the text cut closes it there while the token check went on: its answer is sampled again
    after the cut, from the re-encoded prompt + thought, as the two stages sample it."""
    model, tokenizer, prompt_ids = warm
    monkeypatch.setattr(G, "THINK_CLOSE", "think")
    assert len(tokenizer.encode("think", add_special_tokens=False)) == 5
    read_again = counted_reads(monkeypatch)
    cfg = G.Config(max_thought_tokens=16, max_answer_tokens=4)
    got, expected, _, _ = both_trees(model, tokenizer, prompt_ids, 2, 1, cfg, False, monkeypatch)
    for name in TREE_FIELDS:
        assert getattr(got, name) == getattr(expected, name), name
    close = tokenizer.convert_tokens_to_ids("</think>")
    cut = [p_k for p_k in got.thought_slots() if got.thought_ids[p_k[0]][p_k[1]][-1:] == [close]]
    assert cut and read_again[1] == len(cut)  # the prompts, then the rows cut by the text


# ------------------------------------------------------------------------------------------------
# compiled decoding on static caches, what a GPU runs: the same tokens, compiled once per run
# ------------------------------------------------------------------------------------------------
def assert_compiled_trees_equal_dynamic_ones(model, tokenizer, steps, cfg, samplings, monkeypatch, m=3):
    """For each step's (prompts, images): the tree sampled on the run's StaticCaches equals the dynamic-cache
    tree of the same seed, for each do_sample of `samplings`; every generate() step is fed the same widths
    (nothing the cache holds is read again); the first step compiles and later ones never recompile (torch
    raises on a recompile). Returns the StaticCaches."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # graphs an earlier test compiled for the same shapes would serve this one
    caches = G.StaticCaches(model.config)
    start = counters["stats"]["unique_graphs"]
    widths = []
    prepare = model.prepare_inputs_for_generation

    def recording_prepare(*args, **kwargs):
        inputs = prepare(*args, **kwargs)
        widths.append(tuple(inputs["input_ids"].shape))
        return inputs

    monkeypatch.setattr(model, "prepare_inputs_for_generation", recording_prepare)
    for step, (prompts, vision) in enumerate(steps):
        graphs = counters["stats"]["unique_graphs"]
        with torch.compiler.set_stance("fail_on_recompile" if step else "default"):
            for do_sample in samplings:
                torch.manual_seed(step)
                with G.forward_precision(cfg, torch.device("cpu")):
                    got = G.sample_tree(model, tokenizer, prompts, 2, m, cfg, do_sample, vision, caches)
                got_widths = widths[:]
                widths.clear()
                torch.manual_seed(step)
                with G.forward_precision(cfg, torch.device("cpu")):
                    expected = G.sample_tree(model, tokenizer, prompts, 2, m, cfg, do_sample, vision)
                for name in TREE_FIELDS:
                    assert getattr(got, name) == getattr(expected, name), (step, do_sample, name)
                assert got_widths == widths
                widths.clear()
        if step == 0:
            assert counters["stats"]["unique_graphs"] > start  # it compiled
        else:
            assert counters["stats"]["unique_graphs"] == graphs
    return caches


@pytest.mark.parametrize(
    ("backend", "precision", "m"),
    [
        ("eager", "fp32", 3),
        ("eager", "fp32", 1),
        ("eager", "bf16", 3),
        pytest.param("inductor", "fp32", 3, marks=pytest.mark.slow),
    ],
)
def test_compiled_static_cache_rollouts_equal_the_dynamic_ones_and_never_recompile(
    warm, monkeypatch, backend, precision, m
):
    """Greedy and seeded sampled trees on static caches equal the dynamic-cache path's on padded prompts, on
    prompts of one width and on one-token prompts (nothing prefilled), and nothing compiles after the first
    step. bf16: under CPU autocast, as CUDA runs it (the caches take the dtypes autocast gives keys and
    values), greedy only: a static cache attends over more (masked) columns, so its bf16 sums round apart
    from the dynamic cache's and a seeded draw near a boundary may flip."""
    compiled_with(backend, monkeypatch)
    model, tokenizer, prompt_ids = warm
    cfg = G.Config(max_thought_tokens=16, max_answer_tokens=6, precision=precision)
    one_token = [prompt[-1:] for prompt in prompt_ids]  # nothing to prefill: the caches start empty
    prompts = [prompt_ids, [prompt_ids[0]] * 6, one_token, prompt_ids[::-1], [prompt_ids[1]] * 6]
    samplings = (False, True) if precision == "fp32" else (False,)
    steps = [(step, None) for step in prompts]
    caches = assert_compiled_trees_equal_dynamic_ones(model, tokenizer, steps, cfg, samplings, monkeypatch, m)
    assert len(caches.caches) == min(m, 2)  # one per row count: 6 * 2 thoughts, 6 * 2 * 3 answers


def test_compiled_decoding_is_on_when_asked_and_by_default_on_cuda_only():
    assert G.start_run(G.Config(warmup_steps=0)).decode_caches is None  # auto, on a CPU
    assert G.start_run(G.Config(warmup_steps=0, compile_decode="off")).decode_caches is None
    assert isinstance(
        G.start_run(G.Config(warmup_steps=0, compile_decode="on")).decode_caches, G.StaticCaches
    )


# ------------------------------------------------------------------------------------------------
# the stop check: token ids, not text
# ------------------------------------------------------------------------------------------------
def test_the_stop_check_is_built_once_per_tokenizer(tokenizer):
    assert G.stop_at(tokenizer, G.ANSWER_CLOSE) is G.stop_at(tokenizer, G.ANSWER_CLOSE)
    assert G.stop_at(tokenizer, G.ANSWER_CLOSE) is not G.stop_at(tokenizer, G.THINK_CLOSE)


def test_the_stop_check_stops_a_row_whose_last_tokens_are_the_marker(tokenizer):
    rows = [tokenizer.encode(text, add_special_tokens=False) for text in ("12+1;", "3;+1;", "1;2+;", "1:11;")]
    stop = G.stop_at(tokenizer, "1;")  # a marker of two tokens
    assert stop(torch.tensor(rows), None).tolist() == [True, True, False, True]
    assert stop(torch.tensor([rows[0][-1:]]), None).tolist() == [False]  # shorter than the marker


def test_a_marker_spelt_by_other_tokens_does_not_stop_the_row_but_is_still_cut(tokenizer):
    """The marker "answer" (six character tokens) also appears inside the one token <answer>: the tensor
    compare does not stop that row, and cut_at_stop, which reads the text, still ends it right after it."""
    digits = tokenizer.encode("12", add_special_tokens=False)
    row = digits + tokenizer.encode(G.ANSWER_OPEN, add_special_tokens=False)
    assert len(tokenizer.encode("answer", add_special_tokens=False)) == 6 and len(row) == 3
    assert G.stop_at(tokenizer, "answer")(torch.tensor([row]), None).tolist() == [False]
    assert G.cut_at_stop(row + digits, tokenizer, "answer") == (row, "stop")


def test_a_marker_of_several_tokens_stops_where_stop_strings_stops(tokenizer, monkeypatch):
    """For a marker of two tokens, the tensor compare ends rows at the step at which transformers' text
    matcher ends them: the same tokens and the same number of generate steps."""
    torch.manual_seed(3)
    model = G.build_embedded_model(tokenizer).eval()
    with torch.no_grad():  # larger weights than the init's: rows that differ
        for weight in model.parameters():
            if weight.dim() > 1:
                weight.normal_(0, 0.2)
    prefixes = [tokenizer.encode(text, add_special_tokens=False) for text in ("7+3=?", "12-4=?", "9=?")]
    stop, cfg = "j4", G.Config()  # the third prefix's greedy row writes it at its 7th and 8th tokens
    assert len(tokenizer.encode(stop, add_special_tokens=False)) == 2
    got = sample_continuations(model, tokenizer, prefixes, 2, 12, stop, cfg, False)
    expected = reencoding_continuations(model, tokenizer, prefixes, 2, 12, stop, cfg, False)
    assert got == expected and [ended for _, ended in got].count("stop") == 2
    calls = recorded_logits(model, monkeypatch)
    sample_continuations(model, tokenizer, prefixes[2:], 2, 12, stop, cfg, False)
    reencoding_continuations(model, tokenizer, prefixes[2:], 2, 12, stop, cfg, False)
    assert calls[0].shape[1] == calls[1].shape[1] == 8  # both stopped after the marker, not at 12


# ------------------------------------------------------------------------------------------------
# a vision-language model: positions are M-RoPE's, continued from each row's rope delta
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vlm(one_torch_thread):
    """test_vlm.py's tiny Qwen2-VL, with two prompts of different lengths and their images, the second
    one half as tall again: another patch grid, so the rows' rope offsets differ (-6 and -3)."""
    model, tokenizer, processor, examples = tiny_counting_vlm()
    image = examples[1].images[0]
    examples[1] = dataclasses.replace(
        examples[1], images=[image.resize((image.width, image.height * 3 // 2))]
    )
    with torch.no_grad():  # larger language weights than the init's: thoughts that depend on the prompt
        for name, weight in model.named_parameters():
            if weight.dim() > 1 and "visual" not in name:
                weight.normal_(0, 0.2)
    _, prompt_ids, vision = G.encode_prompts(tokenizer, examples, processor)
    return model, tokenizer, prompt_ids, vision


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_vlm_answers_continued_from_the_thought_cache_equal_answers_from_re_encoded_prefixes(
    vlm, monkeypatch, do_sample
):
    """Rows with images, thoughts closed at different steps and by force: positions after the masked holes are
    M-RoPE's, read from each row's rope delta; the log-probs of every step match the re-encoding path's."""
    model, tokenizer, prompt_ids, vision = vlm
    cfg = G.Config(max_thought_tokens=12, max_answer_tokens=4, temperature=1.0)
    got, expected, got_logits, expected_logits = both_trees(
        model, tokenizer, prompt_ids, 2, 3, cfg, do_sample, monkeypatch, vision
    )
    assert_same_tree(got, expected, got_logits, expected_logits)
    thoughts, _ = endings(got)
    assert thoughts["stop"] and thoughts["forced"]


@pytest.mark.parametrize("close", ["</think>", "think"], ids=["one-token close", "close spelt by letters"])
def test_a_vlm_at_m1_greedy_tree_is_the_two_stage_tree(vlm, monkeypatch, close):
    """M = 1 in one call with images of two sizes: the same tree as the two stages. With the marker "think"
    (five letters), thoughts that wrote the one token </think> are cut by the text and their answers sampled
    again from the re-encoded prompt (and image) + thought."""
    model, tokenizer, prompt_ids, vision = vlm
    monkeypatch.setattr(G, "THINK_CLOSE", close)
    reads = counted_reads(monkeypatch)
    cfg = G.Config(max_thought_tokens=12, max_answer_tokens=4)
    got, expected, _, _ = both_trees(model, tokenizer, prompt_ids, 3, 1, cfg, False, monkeypatch, vision)
    for name in TREE_FIELDS:
        assert getattr(got, name) == getattr(expected, name), name
    thoughts, _ = endings(got)
    if close == "think":  # cut by the text inside a token (<think> here): the prompts, then those rows
        assert len(reads) == 2 and reads[1] > 0
    else:
        assert reads == [len(prompt_ids)] and thoughts["stop"] and thoughts["forced"]


def test_a_vlm_samples_text_only_prompts_after_image_prompts_as_it_does_before_any(vlm):
    """A text-only batch sets its rope offsets to zero: the image rollout's offsets (12 rows: 2 prompts x 2
    thoughts x 3 answers) would broadcast over 6 text prompts x 2 thoughts and shift their positions."""
    model, tokenizer, prompt_ids, vision = vlm
    cfg = G.Config(max_thought_tokens=8, max_answer_tokens=4)
    questions = ["3 dots?", "how many?", "count them", "1+1?", "two", "seven squares?"]
    text_prompts = [
        tokenizer.encode(G.format_prompt(tokenizer, q), add_special_tokens=False) for q in questions
    ]
    rope = next(module for module in model.modules() if hasattr(module, "get_rope_index"))
    rope.rope_deltas = None
    before = G.sample_tree(model, tokenizer, text_prompts, 2, 3, cfg, False)
    G.sample_tree(model, tokenizer, prompt_ids, 2, 3, cfg, False, vision)
    assert rope.rope_deltas.shape == (12, 1) and rope.rope_deltas.abs().sum() > 0
    after = G.sample_tree(model, tokenizer, text_prompts, 2, 3, cfg, False)
    for name in TREE_FIELDS:
        assert getattr(after, name) == getattr(before, name), name


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_a_vlm_compiled_static_cache_rollouts_equal_the_dynamic_ones_and_never_recompile(
    vlm, monkeypatch, backend
):
    """The same for rows with images: generate() continues each row's M-RoPE positions from its rope offset
    outside the compiled step, which is fed them as input, so image rows, the same prompts in another order,
    one prompt repeated and text-only rows all decode through the graphs of the first step."""
    compiled_with(backend, monkeypatch)
    model, tokenizer, prompt_ids, vision = vlm
    cfg = G.Config(max_thought_tokens=8, max_answer_tokens=4, temperature=1.0)
    n = len(prompt_ids)
    text = [
        tokenizer.encode(G.format_prompt(tokenizer, q), add_special_tokens=False) for q in ["3?", "count"]
    ]
    steps = [(prompt_ids, vision), (prompt_ids[::-1], vision[::-1]), ([prompt_ids[0]] * n, [vision[0]] * n)]
    steps.append(((text * n)[:n], None))
    assert_compiled_trees_equal_dynamic_ones(model, tokenizer, steps, cfg, (False, True), monkeypatch)
