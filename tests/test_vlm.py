"""A vision-language policy through the same tree: a tiny Qwen2-VL (built from a config, as the counting demo
builds it) samples with the shared-prefix cache exactly as plain generate() does with the image, and the tree
forward's log-probs and gradients equal a plain forward of every full row, in which the model computes its
own 3-D rotary positions (M-RoPE). Prompts differ in length, so rows are padded differently. Qwen2.5-VL,
whose vision tower attends within windows, is checked in test_qwen2_5_vl.py."""

import pytest
import torch
from conftest import (
    assert_cached_sampling_equals_plain_generate,
    assert_tree_forward_equals_plain_forwards,
    tiny_counting_vlm,
    vlm_tree,
)

import grpo_ma as G

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def vlm():
    return tiny_counting_vlm()


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
    assert_cached_sampling_equals_plain_generate(*vlm, n, monkeypatch)


def test_tree_logprobs_and_gradients_equal_plain_forwards_of_every_row(vlm):
    gradients = assert_tree_forward_equals_plain_forwards(*vlm)
    assert any("visual" in name for name in gradients)  # the image's gradient reaches the vision tower


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
