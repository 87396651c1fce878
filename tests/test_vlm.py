"""A vision-language policy through the same tree: a tiny Qwen2-VL (built from a config, as the counting demo
builds it) samples with the shared-prefix cache exactly as plain generate() does with the image, and the tree
forward's log-probs and gradients equal a plain forward of every full row, in which the model computes its
own 3-D rotary positions (M-RoPE). Prompts differ in length, so rows are padded differently. Qwen2.5-VL,
whose vision tower attends within windows, is checked in test_qwen2_5_vl.py."""

import random

import pytest
import torch
from conftest import plain_inputs, vlm_tree

import grpo_ma as G
from demos import counting_vlm as C

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def vlm():
    torch.manual_seed(0)
    tokenizer = C.build_vlm_tokenizer()
    tokenizer.padding_side = "left"
    processor = C.build_vlm_processor(tokenizer)
    model = C.build_tiny_vlm(tokenizer).eval()
    rng = random.Random(0)
    examples = []
    while len({e.question for e in examples}) < 2:  # two question lengths at least
        fields = C.make_counting_example(rng)
        fields.pop("description")
        examples.append(G.Example(**fields))
    return model, tokenizer, processor, examples[-3:]


def test_prompts_hold_their_image_tokens_and_pixels(vlm):
    model, tokenizer, processor, examples = vlm
    prompts, prompt_ids, vision = G.encode_prompts(tokenizer, examples, processor)
    image_token = model.config.image_token_id
    for prompt, ids, inputs in zip(prompts, prompt_ids, vision):
        assert prompt.endswith(G.THINK_OPEN)
        grid = inputs["image_grid_thw"]
        assert ids.count(image_token) == grid.prod().item() // 4 == 9  # merged 2x2: one token per cell
        assert inputs["pixel_values"].shape[0] == grid.prod().item()


@pytest.mark.parametrize("n", [1, 3])
def test_cached_sampling_equals_plain_generate_with_the_image(vlm, n, monkeypatch):
    """Greedy tokens and every step's logits: a wrong position would change the logits even where the
    random model's argmax does not move."""
    model, tokenizer, processor, examples = vlm
    _, prompt_ids, vision = G.encode_prompts(tokenizer, examples, processor)
    # a second stage too: prefixes that carry a thought after the prompt, of different lengths
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
        got = G.sample_continuations(model, tokenizer, rows, n, 12, G.ANSWER_CLOSE, G.Config(), False, vision)
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


def test_tree_logprobs_and_gradients_equal_plain_forwards_of_every_row(vlm):
    model, tokenizer, processor, examples = vlm
    tree = vlm_tree(tokenizer, processor, examples)
    gen = torch.Generator().manual_seed(2)
    slots = tree.thought_slots()
    weights = G.loss_weights(tree, "token")
    batch = G.build_tree_batch(tree, slots, torch.zeros(3, 2), torch.zeros(3, 2, 3), weights, 0, "cpu")
    mix = torch.randn(batch.weights.shape, generator=gen)  # a loss that weighs every token differently

    model.zero_grad(set_to_none=True)
    got = G.tree_logprobs(model, batch, 1.0)
    (mix * got).sum().backward()
    tree_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    model.zero_grad(set_to_none=True)
    thought_logps, answer_logps = [], []
    for p, k in slots:
        for m, answer in enumerate(tree.answer_ids[p][k]):
            context = tree.prefix(p, k)
            inputs = plain_inputs(model, context + answer, tree.vision[p])
            logps = torch.log_softmax(model(**inputs).logits[0, :-1].float(), -1)
            targets = torch.tensor(context + answer)[1:]
            row = logps.gather(-1, targets[:, None]).squeeze(-1)  # row[j] scores token j + 1
            if m == 0:  # a thought's tokens count once
                start = len(tree.prompt_ids[p]) - 1
                thought_logps.append(row[start : start + len(tree.thought_ids[p][k])])
            answer_logps.append(row[len(context) - 1 :])
    expected = torch.cat(thought_logps + answer_logps)
    (mix * expected).sum().backward()
    flat_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert tree_grads.keys() == flat_grads.keys()
    assert any("visual" in name for name in flat_grads)  # the image's gradient reaches the vision tower
    for name, grad in flat_grads.items():
        torch.testing.assert_close(tree_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_vlm_never_samples_an_image_marker(vlm):
    """One in a thought would be read as an image that is not there. A hook makes <|image_pad|> and
    <|vision_start|> by far the likeliest tokens; sampling must still never write them."""
    model, tokenizer, processor, examples = vlm
    _, prompt_ids, vision = G.encode_prompts(tokenizer, examples, processor)
    markers = [model.config.image_token_id, model.config.vision_start_token_id]

    def prefer_markers(module, inputs, output):
        output.logits[..., markers] += 50.0
        return output

    hook = model.register_forward_hook(prefer_markers)
    try:
        torch.manual_seed(0)
        tree = G.sample_tree(
            model, tokenizer, prompt_ids, 2, 2, G.Config(max_thought_tokens=6), vision=vision
        )
    finally:
        hook.remove()
    written = [t for p, k in tree.thought_slots() for t in tree.thought_ids[p][k]]
    written += [t for p, k, m in tree.answer_slots() for t in tree.answer_ids[p][k][m]]
    assert written and not set(written) & set(markers)


def test_examples_with_images_need_a_processor(vlm):
    _, tokenizer, _, examples = vlm
    with pytest.raises(ValueError, match="carry images"):
        G.encode_prompts(tokenizer, examples)


def test_tree_forward_under_bf16_autocast_follows_the_float32_one(vlm):
    """--precision bf16 on the CPU runs what CUDA runs: the pixels, the M-RoPE positions and the cache of a
    vision-language model through autocast. The log-probs stay within bf16's rounding of float32's, and the
    gradient still reaches the vision tower."""
    model, tokenizer, processor, examples = vlm
    tree = vlm_tree(tokenizer, processor, examples)
    weights = G.loss_weights(tree, "token")
    batch = G.build_tree_batch(
        tree, tree.thought_slots(), torch.zeros(3, 2), torch.zeros(3, 2, 3), weights, 0, "cpu"
    )
    with torch.no_grad():
        full = G.tree_logprobs(model, batch, 1.0)
    model.zero_grad(set_to_none=True)
    with G.forward_precision(G.Config(precision="bf16"), torch.device("cpu")):
        half = G.tree_logprobs(model, batch, 1.0)
    half.sum().backward()
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert 0 < (half - full).abs().max() < 0.1  # bf16 did run, and only rounded
    visual = [p.grad for name, p in model.named_parameters() if "visual" in name and p.grad is not None]
    assert visual and all(torch.isfinite(grad).all() for grad in visual)
    model.zero_grad(set_to_none=True)
