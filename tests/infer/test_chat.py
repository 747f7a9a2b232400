"""Chat template (DeepSeek markers or the byte tokenizer's specials) and R1 reasoning split."""
import pytest

from dsjax.infer.chat import BYTE, DEEPSEEK, chat_prompt, encode_chat, markers_for, split_reasoning
from dsjax.train.tokenizer import load_tokenizer


def test_byte_template():
    tok = load_tokenizer(None)
    assert markers_for(tok) == BYTE
    ids = chat_prompt("hi", tok, system="be brief", think=True)
    assert ids[0] == tok.bos_id
    assert tok.decode(ids[1:]) == "<|system|>be brief<|user|>hi<|assistant|><think>\n"
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>r</think>b"},
            {"role": "user", "content": "c"}]
    ids = encode_chat(msgs, tok)
    i = ids.index(tok.eos_id)  # an earlier assistant turn ends with eos (as an id, not text)
    assert tok.decode(ids[1:i]) == "<|user|>a<|assistant|>b"  # its reasoning is dropped, as in R1
    assert tok.decode(ids[i + 1:]) == "<|user|>c<|assistant|>"
    with pytest.raises(ValueError, match="role"):
        encode_chat([{"role": "tool", "content": "x"}], tok)


def test_deepseek_markers_with_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>"]
    vocab = {w: i for i, w in enumerate(specials + ["[UNK]", "hello", "\n"])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Split("\n", "isolated")
    t.add_special_tokens(specials)
    t.save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(str(tmp_path))
    assert markers_for(tok) == DEEPSEEK
    ids = chat_prompt("hello", tok, think=True)
    assert ids == [0, 2, 6, 3, 4, 7]  # bos, <｜User｜>, hello, <｜Assistant｜>, <think>, \n


@pytest.mark.parametrize("text, opened, want", [
    ("<think>because</think> 42", False, ("because", "42")),
    ("because\n</think>\n42", True, ("because", "42")),
    ("still thinking", True, ("still thinking", "")),
    ("<think>still", False, ("still", "")),
    ("just 42", False, ("", "just 42")),
])
def test_split_reasoning(text, opened, want):
    assert split_reasoning(text, opened=opened) == want
