"""What the test modules share. One hypothesis profile for every machine, CI included (a profile that drew
fixed examples only in CI would hide a property that fails one fresh draw in ten); a failing draw prints the
blob that reproduces it. Fixtures for modules that train small models or must stay offline. And the builders
more than one module uses, kept here once: the char tokenizer and the embedded model, hand-built trees, tiny
run settings, a reward that varies from the first step, and readers of what a run writes.

Modules import the plain functions by name (`from conftest import ragged_tree`); pytest puts this folder on
the import path."""

import json
import random
import socket
from pathlib import Path

import pytest
import torch
from hypothesis import settings

import grpo_ma as G
import grpo_ma_run as R

settings.register_profile("grpo-ma", deadline=None, print_blob=True)
settings.load_profile("grpo-ma")


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for the module (use it with pytest.mark.usefixtures): the tiny models gain nothing
    from more, and on a shared CPU OpenMP threads that wait for each other make every step many times
    slower. OMP_NUM_THREADS tells grpo_ma.train to keep this thread count."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def tokenizer():
    """grpo_ma's character tokenizer (the embedded default's)."""
    return G.build_char_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    """The embedded Qwen2 model, randomly initialised from seed 0, in eval mode."""
    torch.manual_seed(0)
    return G.build_embedded_model(tokenizer).eval()


# ------------------------------------------------------------------------------------------------
# a reward that varies
# ------------------------------------------------------------------------------------------------
def answer_length(prompts, thoughts, answers, examples):
    """A reward that varies from the first step: a tenth of the answer's length in characters. The embedded
    start policy after a short warm-up scores 0 everywhere on accuracy and format, so with those rewards
    nothing would learn and two runs would agree trivially."""
    return [len(answer) / 10 for answer in answers]


REWARDS = [(answer_length, 1.0)]


# ------------------------------------------------------------------------------------------------
# hand-built trees (no model needed)
# ------------------------------------------------------------------------------------------------
def digit_tree(tokenizer, prompts, k, m, *, seed=0, forced=(), closed=()):
    """A hand-built tree of random digit tokens (no model needed). Thoughts (p, k) in `forced` were closed
    by force; those in `closed` end with a </think> they sampled themselves."""
    rng = random.Random(seed)
    close = tokenizer.encode(G.THINK_CLOSE, add_special_tokens=False)

    def tokens(low, high):
        return [
            tokenizer.convert_tokens_to_ids(str(rng.randint(0, 9))) for _ in range(rng.randint(low, high))
        ]

    prompt_ids = [tokens(3, 5) for _ in range(prompts)]
    thought_ids = [
        [tokens(2, 6) + (close if (p, j) in closed else []) for j in range(k)] for p in range(prompts)
    ]
    forced_close = [[close if (p, j) in forced else [] for j in range(k)] for p in range(prompts)]
    answer_ids = [[[tokens(1, 4) for _ in range(m)] for _ in range(k)] for _ in range(prompts)]
    thoughts = [[""] * k for _ in range(prompts)]
    answers = [[[""] * m for _ in range(k)] for _ in range(prompts)]
    return G.Tree(prompt_ids, thought_ids, forced_close, answer_ids, thoughts, answers)


def ragged_tree(tokenizer, prompts, k, m, seed=0, prompt_lengths=(2, 6), thought_lengths=(1, 7)):
    """Random digit tokens with ragged prompts, thoughts and answers (lengths drawn within the bounds given,
    answers of 1 to 5 tokens); every third thought closed by force, and thought (0, 1) empty (it ended at
    once and was closed by force)."""
    rng = random.Random(seed)
    close = tokenizer.encode(G.THINK_CLOSE, add_special_tokens=False)

    def tokens(low, high):
        return [
            tokenizer.convert_tokens_to_ids(str(rng.randint(0, 9))) for _ in range(rng.randint(low, high))
        ]

    prompt_ids = [tokens(*prompt_lengths) for _ in range(prompts)]
    thought_ids = [[tokens(*thought_lengths) for _ in range(k)] for _ in range(prompts)]
    thought_ids[0][1] = []
    forced = [[close if (p * k + j) % 3 == 1 else [] for j in range(k)] for p in range(prompts)]
    answer_ids = [[[tokens(1, 5) for _ in range(m)] for _ in range(k)] for _ in range(prompts)]
    thoughts = [[""] * k for _ in range(prompts)]
    answers = [[[""] * m for _ in range(k)] for _ in range(prompts)]
    return G.Tree(prompt_ids, thought_ids, forced, answer_ids, thoughts, answers)


# ------------------------------------------------------------------------------------------------
# tiny settings
# ------------------------------------------------------------------------------------------------
def tiny_config(out, **changes):
    """T2A2 on 2 prompts, 5 warm-up steps, 8 held-out prompts: a few seconds on a CPU."""
    settings = dict(thoughts=2, answers=2, prompts_per_step=2, steps=2, warmup_steps=5, eval_size=8)
    return R.RunConfig(**(settings | {"out": str(out)} | changes))


LEARNING = dict(steps=4, save_every=2, eval_every=3)


def config_from_flags(flags):
    """The RunConfig grpo_ma_run's CLI builds from these flags."""
    return R.parse_args(flags)


def small_config(**changes):
    """T3A2 on 2 prompts with short budgets, no KL and no warm-up: one step in a second."""
    settings = dict(thoughts=3, answers=2, prompts_per_step=2, max_thought_tokens=8, max_answer_tokens=5)
    return G.Config(**(settings | dict(beta=0.0, warmup_steps=0) | changes))


def start(cfg):
    """A fresh run and its AdamW, as train() makes them (without the warm-up)."""
    run = G.start_run(cfg, reward_fns=[(answer_length, 1.0)])
    return run, torch.optim.AdamW(run.policy.parameters(), lr=cfg.lr, weight_decay=0.0)


# ------------------------------------------------------------------------------------------------
# what a run writes
# ------------------------------------------------------------------------------------------------
def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def load_checkpoint(folder, name="checkpoint.pt"):
    return torch.load(folder / name, map_location="cpu", weights_only=True)


def assert_same_tensors(left: dict, right: dict):
    assert left.keys() == right.keys()
    for name, tensor in left.items():
        assert torch.equal(tensor, right[name]), name


def assert_trained(folder):
    """Every step of the run in `folder` had a gradient, and the final weights differ from the start policy
    (reference.pt)."""
    assert all(line["grad_norm"] > 0 for line in read_metrics(folder)[1:])
    final = load_checkpoint(folder)["model"]
    start = torch.load(folder / "reference.pt", map_location="cpu")
    assert any(not torch.equal(final[name], start[name]) for name in start)


def assert_learned(folder):
    """The run in `folder` learned: rewards varied, every step had a gradient, and the weights moved away
    from the start policy (reference.pt)."""
    lines = read_metrics(folder)[1:]
    assert lines and all(line["reward_std"] > 0 for line in lines)
    assert_trained(folder)


# ------------------------------------------------------------------------------------------------
# vision-language models
# ------------------------------------------------------------------------------------------------
def plain_inputs(model, ids: list[int], vision: dict) -> dict:
    """One unpadded row as generate() or a training forward gets it from the processor: the model derives
    its M-RoPE positions from the image-token types itself."""
    input_ids = torch.tensor([ids])
    image_tokens = (input_ids == model.config.image_token_id).int()
    inputs = dict(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids), mm_token_type_ids=image_tokens
    )
    return inputs | vision


def vlm_tree(tokenizer, processor, examples, k=2, m=3, seed=1) -> G.Tree:
    """A tree on the examples' prompts, with random thoughts and answers of ragged lengths."""
    _, prompt_ids, vision = G.encode_prompts(tokenizer, examples, processor)
    rng = random.Random(seed)
    chars = tokenizer.encode("0123456789+=:;", add_special_tokens=False)

    def tokens(low, high):
        return [rng.choice(chars) for _ in range(rng.randint(low, high))]

    thoughts = [[tokens(1, 6) for _ in range(k)] for _ in prompt_ids]
    forced = [[[] for _ in range(k)] for _ in prompt_ids]
    answers = [[[tokens(1, 4) for _ in range(m)] for _ in range(k)] for _ in prompt_ids]
    return G.Tree(prompt_ids, thoughts, forced, answers, [], [], [], vision)


def assert_cached_sampling_equals_plain_generate(model, tokenizer, processor, examples, n, monkeypatch):
    """A vision-language model's cached two-stage sampling (greedy, n continuations a prefix) gives the tokens
    and every step's logits of its own plain generate() on each unpadded row with its pixels, for prompts and
    for second-stage prefixes that carry a thought: a wrong position would change the logits even where the
    random model's argmax does not move."""
    _, prompt_ids, vision = G.encode_prompts(tokenizer, examples, processor)
    digits = tokenizer.encode("1:0+1=1;", add_special_tokens=False)
    prefixes = [ids + digits[: 2 + i] for i, ids in enumerate(prompt_ids)]
    real_generate = model.generate
    recorded = []

    def generate_and_record(**kwargs):
        out = real_generate(**kwargs, output_logits=True, return_dict_in_generate=True)
        recorded.append(torch.stack(out.logits, 1))  # (rows, new tokens, V)
        return out.sequences

    monkeypatch.setattr(model, "generate", generate_and_record)
    for rows in (prompt_ids, prefixes):
        recorded.clear()
        got = sample_continuations(model, tokenizer, rows, n, 12, G.ANSWER_CLOSE, G.Config(), False, vision)
        for i, (ids, inputs) in enumerate(zip(rows, vision)):
            plain = plain_inputs(model, ids, inputs)
            out = real_generate(
                **plain, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True
            )
            expected = G.cut_at_stop(out.sequences[0, len(ids) :].tolist(), tokenizer, G.ANSWER_CLOSE)
            assert [got[i * n + j] for j in range(n)] == [expected] * n
            steps = len(out.logits)
            for j in range(n):
                torch.testing.assert_close(
                    recorded[0][i * n + j, :steps], torch.cat(out.logits), rtol=1e-4, atol=1e-4
                )


def assert_tree_forward_equals_plain_forwards(model, tokenizer, processor, examples) -> dict:
    """A vision-language model's tree forward (each prompt once with its image, its cache repeated for its
    thoughts, each thought's for its answers, positions continued from the parent's last M-RoPE position)
    scores and differentiates as a plain forward of every full row, in which the model computes its own
    positions: in one micro-batch, and with the first prompt's thoughts split over two. Returns the
    gradients."""
    tree = vlm_tree(tokenizer, processor, examples)
    gen = torch.Generator().manual_seed(2)
    slots = tree.thought_slots()
    thought_adv, answer_adv = torch.randn(3, 2, generator=gen), torch.randn(3, 2, 3, generator=gen)
    weights = G.loss_weights(tree, "token")

    def tree_pass(packs):
        """Sum of advantage * log-prob over every counted token, one backward per micro-batch."""
        model.zero_grad(set_to_none=True)
        logps = []
        for pack in packs:
            batch = G.build_tree_batch(tree, pack, thought_adv, answer_adv, weights, 0, "cpu")
            logps.append(G.tree_logprobs(model, batch, 1.0))
            (batch.advantages * logps[-1]).sum().backward()
        return logps, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    (got,), tree_grads = tree_pass([slots])
    _, split_grads = tree_pass([slots[:1], slots[1:]])

    model.zero_grad(set_to_none=True)
    thought_logps, answer_logps, loss = [], [], 0.0
    for p, k in slots:
        for m, answer in enumerate(tree.answer_ids[p][k]):
            context = prefix(tree, p, k)
            logits = model(**plain_inputs(model, context + answer, tree.vision[p])).logits
            logps = torch.log_softmax(logits[0, :-1].float(), -1)
            targets = torch.tensor(context + answer)[1:]
            row = logps.gather(-1, targets[:, None]).squeeze(-1)  # row[j] scores token j + 1
            if m == 0:  # a thought's tokens count once
                start = len(tree.prompt_ids[p]) - 1
                thought_logps.append(row[start : start + len(tree.thought_ids[p][k])])
                loss = loss + thought_adv[p, k] * thought_logps[-1].sum()
            answer_logps.append(row[len(context) - 1 :])
            loss = loss + answer_adv[p, k, m] * answer_logps[-1].sum()
    expected = torch.cat(thought_logps + answer_logps)
    loss.backward()
    flat_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for grads in (tree_grads, split_grads):
        assert grads.keys() == flat_grads.keys()
        for name, grad in flat_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    return flat_grads


def sample_continuations(model, tokenizer, prefixes, n, budget, stop, cfg, do_sample, vision=None):
    """n continuations of every prefix (with its images), as grpo_ma.sample_rows returns them."""
    ids, mask, cache = G.read_prefixes(model, tokenizer, prefixes, vision)
    return G.sample_rows(model, tokenizer, (ids, mask), cache, n, budget, stop, cfg, do_sample)[0]


def prefix(tree, p: int, k: int) -> list[int]:
    """Prompt + thought + forced close: what every answer of thought (p, k) continues."""
    return tree.prompt_ids[p] + tree.thought_ids[p][k] + tree.forced_close[p][k]


def tiny_counting_vlm():
    """The tiny Qwen2-VL of the counting demo (torch seeded 0), its left-padding tokenizer, its processor,
    and three counting examples with their images, of two question lengths at least."""
    from demos import counting_vlm as C

    torch.manual_seed(0)
    tokenizer = C.build_vlm_tokenizer()
    tokenizer.padding_side = "left"
    processor = C.build_vlm_processor(tokenizer)
    model = C.build_tiny_vlm(tokenizer).eval()
    rng = random.Random(0)
    examples = []
    while len({e.question for e in examples}) < 2:
        fields = C.make_counting_example(rng)
        fields.pop("description")
        examples.append(G.Example(**fields))
    return model, tokenizer, processor, examples[-3:]


def compiled_with(backend: str, monkeypatch) -> None:
    """generate()'s decode step compiled by `backend`: eager traces and guards as inductor does (what
    recompiles) in seconds; inductor's code is what a GPU runs."""
    real_config = G.compile_config

    def compile_config(device):
        config = real_config(device)
        config.backend = backend
        return config

    monkeypatch.setattr(G, "compile_config", compile_config)
