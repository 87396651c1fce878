"""A tiny Qwen2.5-VL through grpo_ma's vision-language path: two-stage sampling with the shared-prefix cache
equals plain generate() with the image, the tree forward's log-probs and gradients equal plain forwards of
every row, and a LoRA run trains only its adapters against the adapter-off model and reloads from OUT/final.

Qwen2.5-VL is not Qwen2-VL with another name. Its vision tower attends within windows of merged patches
(`window_size`, in pixels) except in the full-attention blocks (`fullatt_block_indexes`), so the patches are
reordered window by window inside the tower and put back in image order at the end; its vision MLP has
gate/up/down projections, the names LoRA targets in the text model; and its text model's M-RoPE
(`mrope_section`, summing to head_dim / 2) is computed by its own get_rope_index. The tiny model here has one
windowed and one full-attention vision block, and a window of 2x2 merged tokens, so that the counting demo's
84-pixel image (3x3 merged tokens) is split into four windows."""

import json
import math
import random
import socket
import zlib

import pytest
import torch
from conftest import (
    assert_cached_sampling_equals_plain_generate,
    assert_tree_forward_equals_plain_forwards,
    plain_inputs,
)
from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import grpo_ma as G
from demos import counting_vlm as C  # importing it registers the image-only processor with AutoProcessor

pytestmark = pytest.mark.usefixtures("one_torch_thread")
WINDOW_PIXELS = 2 * C.CELL_PIXELS  # 2x2 merged tokens per window: the 3x3 image splits into 4 windows


def build_tiny_qwen2_5_vl(tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    """A Qwen2_5_VLForConditionalGeneration from a config, about 200k parameters: a 2-block vision tower
    (block 0 windowed, block 1 full attention) and a 3-layer text model of 4 heads of 16 dims, whose 8
    rotary frequencies M-RoPE splits into temporal, height and width sections."""
    vision = dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, out_hidden_size=64)
    vision.update(patch_size=C.PATCH_SIZE, spatial_merge_size=C.SPATIAL_MERGE_SIZE, temporal_patch_size=2)
    vision.update(window_size=WINDOW_PIXELS, fullatt_block_indexes=[1])
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, max_position_embeddings=256)
    text.update(num_attention_heads=4, num_key_value_heads=2, rope_parameters=rope)
    text.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    text["eos_token_id"] = tokenizer.eos_token_id
    ids = {name: tokenizer.convert_tokens_to_ids(marker) for name, marker in C.MARKER_CONFIG_FIELDS.items()}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    return Qwen2_5_VLForConditionalGeneration(config)


def counting_examples(seed: int, n: int) -> list[G.Example]:
    """n counting scenes of the demo; their questions differ in length, so prompts are padded differently."""
    return C.to_examples(C.sample_counting_examples(random.Random(seed), n, held_out=False))


@pytest.fixture(scope="module")
def qwen25():
    torch.manual_seed(0)
    tokenizer = C.build_vlm_tokenizer()
    tokenizer.padding_side = "left"
    processor = C.build_vlm_processor(tokenizer)  # the image processing of Qwen2.5-VL is Qwen2-VL's
    model = build_tiny_qwen2_5_vl(tokenizer).eval()
    examples = counting_examples(0, 3)
    assert len({len(e.question) for e in examples}) >= 2
    return model, tokenizer, processor, examples


def test_the_tiny_config_has_windowed_and_full_attention_vision_blocks(qwen25):
    """The tests below are worth something only if the tiny model exercises what Qwen2.5-VL adds: making
    every vision block windowed, or every block full, must change the image features (with a single
    window the two kinds of attention would agree); and M-RoPE must cover every rotary frequency."""
    model, tokenizer, processor, examples = qwen25
    _, _, vision = G.encode_prompts(tokenizer, examples[:1], processor)
    visual = model.model.visual
    pixels, grid = vision[0]["pixel_values"], vision[0]["image_grid_thw"]
    assert grid.tolist() == [[1, 6, 6]]
    configured = list(visual.fullatt_block_indexes)
    blocks = list(range(len(visual.blocks)))
    assert 0 < len(configured) < len(blocks)  # some blocks windowed, some full

    def features(full_blocks):
        visual.fullatt_block_indexes = full_blocks
        try:
            with torch.no_grad():
                return visual(pixels, grid_thw=grid).pooler_output
        finally:
            visual.fullatt_block_indexes = configured

    for other in ([], blocks):  # all windowed, all full
        assert (features(other) - features(configured)).abs().max() > 1e-4, other
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert sum(p.numel() for p in model.parameters()) < 300_000


@pytest.mark.parametrize("n", [1, 3])
def test_cached_sampling_equals_plain_generate_with_the_image(qwen25, n, monkeypatch):
    """Also a check of the M-RoPE offsets a Qwen2.5-VL keeps per row (not repeated with its row, they shift
    every later position)."""
    assert_cached_sampling_equals_plain_generate(*qwen25, n, monkeypatch)


def test_tree_logprobs_and_gradients_equal_plain_forwards_of_every_row(qwen25):
    gradients = assert_tree_forward_equals_plain_forwards(*qwen25)
    for block in ("visual.blocks.0.", "visual.blocks.1."):  # the windowed and the full-attention block
        assert any(block in name for name in gradients), block


# ------------------------------------------------------------------------------------------------
# a LoRA run from a saved folder
# ------------------------------------------------------------------------------------------------
def answer_text_hash(prompts, thoughts, answers, examples):
    """A reward that differs between answers whose texts differ: the random policy's accuracy is 0
    everywhere, so with it no advantage would be non-zero and no adapter could move."""
    return [zlib.crc32(answer.encode()) % 100 / 100 for answer in answers]


@pytest.fixture(scope="module")
def lora_run(qwen25, tmp_path_factory):
    """The tiny Qwen2.5-VL saved with its processor (and tokenizer) like a hub checkpoint, then two LoRA
    steps from that folder, offline. Returns the start folder, the run folder, the policy as train() saved
    it, and every reference forward (its micro-batch and the log-probs it gave)."""
    model, _, processor, _ = qwen25
    start = tmp_path_factory.mktemp("qwen2_5_vl")
    model.save_pretrained(start)
    processor.save_pretrained(start)
    out = start.parent / f"{start.name}-run"
    sizes = dict(thoughts=2, answers=2, prompts_per_step=2, max_thought_tokens=6, max_answer_tokens=4)
    # lr 1e-2: two steps must move the adapter enough that the reloaded logits are told from the start's
    run = dict(lora_rank=4, steps=2, warmup_steps=0, lr=1e-2, eval_size=2, device="cpu", out=str(out))
    cfg = G.Config(model=str(start), **sizes, **run)
    references, saved = [], {}
    real_reference, real_save_model = G.reference_logprobs, G.save_model

    def record_reference(reference, batch, cfg):
        logps = real_reference(reference, batch, cfg)
        references.append((batch, logps))
        return logps

    def record_policy(run, folder, model=None):
        saved["policy"] = run.policy
        return real_save_model(run, folder, model)

    def refuse(*args, **kwargs):
        raise AssertionError("the run tried to reach the network")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)  # the no_network fixture, at module scope
        patch.setattr(G, "reference_logprobs", record_reference)
        patch.setattr(G, "save_model", record_policy)
        G.train(cfg, counting_examples(1, 6), counting_examples(2, 2), [(answer_text_hash, 1.0)])
    return start, out, saved["policy"].eval(), references


def test_a_lora_step_moves_only_the_adapters_against_the_adapter_off_model(lora_run, no_network):
    """With LoRA the KL reference is the policy with its adapter switched off: it must score every token
    exactly as the saved start model does (no second copy, no drift), and only adapter weights may move.
    Unlike Qwen2-VL's fc1/fc2, Qwen2.5-VL's vision MLP names match the default targets, so the tower gets
    adapters too, and they train."""
    from safetensors.torch import load_file

    start, out, policy, references = lora_run
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    for m in metrics[1:]:
        assert m["reward_std"] > 0 and m["beta"] > 0 and math.isfinite(m["kl"])
    assert metrics[1]["kl"] == 0.0 and metrics[2]["kl"] > 0  # a fresh adapter is its reference, then moves

    base = AutoModelForImageTextToText.from_pretrained(start).eval()
    assert len(references) == 2  # one micro-batch per step
    with torch.no_grad():
        for batch, logps in references:
            torch.testing.assert_close(logps, G.tree_logprobs(base, batch, 1.0), rtol=1e-5, atol=1e-5)

    trained = policy.state_dict()
    adapters = {name: tensor for name, tensor in trained.items() if "lora_" in name}
    at_start = base.state_dict()
    for name, tensor in trained.items():
        if name not in adapters:  # every base weight is still the saved start's
            plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(tensor, at_start[plain]), name
    moved = [name for name, tensor in adapters.items() if "lora_B" in name and tensor.abs().sum() > 0]
    assert any("language_model" in name for name in moved)
    assert any("visual" in name for name in moved)
    final = load_file(out / G.FINAL / "adapter_model.safetensors")
    assert final and all("lora_" in name for name in final)  # OUT/final ships no base weight of its own


def prompt_logits(model, processor) -> torch.Tensor:
    """The logits of one counting prompt with its image, encoded by `processor`."""
    _, prompt_ids, vision = G.encode_prompts(processor.tokenizer, counting_examples(3, 1), processor)
    with torch.no_grad():
        return model(**plain_inputs(model, prompt_ids[0], vision[0])).logits


def test_the_trained_adapter_reloads_offline_and_gives_the_trained_logits(lora_run, qwen25, no_network):
    """OUT/final holds the adapter and the processor: loaded with peft on the start folder's model, or by
    the image-text-to-text auto class (which finds the base model the adapter names), it must be the
    trained policy, logit for logit, on a prompt with its image, and not the start model."""
    from peft import PeftModel
    from transformers import AutoProcessor

    start, out, policy, _ = lora_run
    _, tokenizer, start_processor, _ = qwen25
    processor = AutoProcessor.from_pretrained(out / G.FINAL)
    examples = counting_examples(3, 1)
    _, reloaded_ids, reloaded_vision = G.encode_prompts(processor.tokenizer, examples, processor)
    _, prompt_ids, vision = G.encode_prompts(tokenizer, examples, start_processor)
    assert reloaded_ids == prompt_ids  # the saved processor writes the same image tokens and pixels
    torch.testing.assert_close(reloaded_vision, vision, rtol=0, atol=0)
    expected = prompt_logits(policy.eval(), processor)
    base = AutoModelForImageTextToText.from_pretrained(start).eval()
    start_logits = prompt_logits(base, processor)
    for reloaded in (
        PeftModel.from_pretrained(base, out / G.FINAL),
        AutoModelForImageTextToText.from_pretrained(out / G.FINAL),
    ):
        got = prompt_logits(reloaded.eval(), processor)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (expected - start_logits).abs().max() > 1e-3


def test_a_lora_runs_final_folder_loads_as_the_trained_policy_through_model(lora_run, no_network):
    """OUT/final is meant to be what --model loads to go on from a run (to evaluate it, or to train it
    further). With LoRA it holds only the adapter and the processor, and the adapter names its base."""
    _, out, policy, _ = lora_run
    model, _, processor = G.load_policy(G.Config(model=str(out / G.FINAL), device="cpu"), torch.device("cpu"))
    assert processor is not None
    expected = prompt_logits(policy.eval(), processor)
    torch.testing.assert_close(prompt_logits(model.eval(), processor), expected, rtol=1e-5, atol=1e-5)
