"""The task and the model it runs on: the problems a step draws differ, a tokenizer that cannot spell the
format markers is refused, and a real checkpoint loads through --model (AutoModelForCausalLM, AutoTokenizer
and its chat template), trains, and its trained policy in OUT/final loads back through the same flag."""

import random

import pytest
import torch
from conftest import REWARDS, assert_learned, assert_same_tensors, config_from_flags, load_checkpoint

import grpo_ma as G
import grpo_ma_run as R

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_seeded_examples_differ_by_prompt():
    """The end-to-end tests rely on prompts of one step being different problems."""
    examples = G.sample_examples(random.Random(0), "addsub", 8, held_out=False)
    assert len({e.question for e in examples}) == 8


def test_tokenizer_without_format_markers_is_rejected():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    letters = ["<unk>", "<eos>"] + list("0123456789<>/abcdefghijklmnopqrstuvwxyz")
    vocab = {c: i for i, c in enumerate(letters)}
    plain = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab, [], unk_token="<unk>")),
        unk_token="<unk>",
        eos_token="<eos>",
    )
    plain.backend_tokenizer.decoder = decoders.Fuse()
    G.check_format_markers(plain)  # spelled out character by character, the markers survive
    digits = {c: i for i, c in enumerate(["<unk>", "<eos>"] + list("0123456789"))}
    no_markers = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(digits, [], unk_token="<unk>")),
        unk_token="<unk>",
        eos_token="<eos>",
    )
    with pytest.raises(ValueError, match="format marker '<think>'"):
        G.check_format_markers(no_markers)


def test_real_checkpoint_loads_through_model_flag(tmp_path):
    """The --model path (AutoModelForCausalLM + AutoTokenizer + chat template), on a small Qwen2 saved here;
    the trained policy in OUT/final loads back through the same flag."""
    tokenizer = G.build_char_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}=?{% endif %}"
    )
    torch.manual_seed(0)
    G.build_embedded_model(tokenizer).save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")
    loaded = G.load_policy(G.Config(model=str(tmp_path / "qwen")), torch.device("cpu"))[1]
    assert G.format_prompt(loaded, "7+3") == "7+3=?" + G.THINK_OPEN  # built by the chat template
    flags = ["--thoughts", "2", "--answers", "2", "--prompts-per-step", "2", "--steps", "2"]
    flags += [
        "--warmup-steps",
        "5",
        "--eval-size",
        "4",
        "--model",
        str(tmp_path / "qwen"),
        "--out",
        str(tmp_path / "run"),
    ]
    summary = R.train(config_from_flags(flags), reward_fns=REWARDS)
    assert summary["steps"] == 2
    assert_learned(tmp_path / "run")
    trained, _, _ = G.load_policy(G.Config(model=str(tmp_path / "run" / "final")), torch.device("cpu"))
    assert_same_tensors(trained.state_dict(), load_checkpoint(tmp_path / "run")["model"])
