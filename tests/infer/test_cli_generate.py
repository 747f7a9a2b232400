"""`dsjax generate`: streams text from a saved checkpoint; user errors exit 2 with a message."""
import numpy as np
import pytest

from dsjax.cli import main
from dsjax.infer import stream
from dsjax.train.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_model):
    path = tmp_path_factory.mktemp("ckpt")
    tiny_model.save_pretrained(str(path))
    return str(path)


def test_generate_streams_text(ckpt, capsys):
    import dsjax

    rc = main(["generate", "--checkpoint", ckpt, "--prompt", "hi", "--max-new-tokens", "6", "--chat", "--think"])
    out = capsys.readouterr().out
    assert rc == 0
    # Independent of the CLI's incremental decoding: the same tokens, decoded at once.
    tok = load_tokenizer(None)
    from dsjax.infer.chat import chat_prompt

    ids = chat_prompt("hi", tok, think=True)
    model = dsjax.from_pretrained(ckpt)
    toks = np.concatenate(list(stream(model, [ids], max_new_tokens=6, stop_tokens=[tok.eos_id])), axis=1)[0]
    assert out == tok.decode([t for t in toks if t != tok.eos_id]) + "\n"


@pytest.mark.parametrize("args, msg", [
    (["--checkpoint", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
    (["--temperature", "-1"], "-1"),
    (["--top-p", "2"], "--top-p"),
    (["--think"], "--chat"),
    (["--prompt", "x" * 70], "max_position_embeddings 64"),
])
def test_errors_exit_2(ckpt, capsys, args, msg):
    base = {"--checkpoint": ckpt, "--prompt": "hi"}
    flags = dict(zip(args[::2], args[1::2])) if args[0] != "--think" else {}
    argv = ["generate"] + [x for k, v in {**base, **flags}.items() for x in (k, v)] + (["--think"] if args == ["--think"] else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err, err
