"""`dsjax sft / grpo / distill`: every configs/rl_*.yaml loads into its config class; bad input (a missing
config, data or task file, an unknown key, a bad value, no teacher) exits 2 with a message naming the file,
key or value, before any model is built. (Full runs: test_sft, test_grpo_train, test_distill.)"""
import glob
import os
import sys

import pytest
import yaml

from dsjax.cli import main
from dsjax.rl.distill import DistillConfig
from dsjax.rl.grpo_trainer import GRPOConfig
from dsjax.rl.plot import plot_grpo
from dsjax.rl.sft import SFTConfig, load_rl_config

CLASSES = {"sft": SFTConfig, "grpo": GRPOConfig, "distill": DistillConfig}


def _kind(path):
    d = yaml.safe_load(open(path))
    return "distill" if "teacher" in d else "sft" if "data" in d else "grpo"


@pytest.mark.parametrize("path", sorted(glob.glob("configs/rl_*.yaml")))
def test_rl_configs_load(path):
    cfg = load_rl_config(CLASSES[_kind(path)], path)
    assert cfg.model.num_nextn_predict_layers == 0  # all CPU-sized toy runs


def test_rl_config_files_cover_all_three_commands():
    assert {_kind(p) for p in glob.glob("configs/rl_*.yaml")} == set(CLASSES)


@pytest.mark.parametrize("argv, msg", [
    (["sft", "--config", "configs/no_such.yaml"], "configs/no_such.yaml"),
    (["sft", "--config", "configs/rl_sft_toy.yaml", "data=/nonexistent/chat.jsonl"], "/nonexistent/chat.jsonl"),
    (["sft", "--config", "configs/rl_sft_toy.yaml", "no_such_key=1"], "no_such_key"),
    (["sft", "--config", "configs/rl_sft_toy.yaml", "model.no_such_field=1"], "no_such_field"),
    (["sft", "--config", "configs/rl_sft_toy.yaml", "lr=fast"], "'lr'"),
    (["sft", "--config", "configs/rl_sft_toy.yaml", "max_value=5"], "max_value"),
    (["sft", "--config", "configs/rl_sft_toy.yaml", "init=/nonexistent/ckpt"], "/nonexistent/ckpt"),
    (["sft", "data=toy", "seq_len=99999"], "seq_len"),
    (["grpo", "--config", "configs/rl_toy.yaml", "task=/nonexistent/problems.jsonl"], "/nonexistent/problems.jsonl"),
    (["grpo", "--config", "configs/rl_toy.yaml", "rewards=accuracy,no_such_reward", "reward_weights=1,1"],
     "no_such_reward"),
    (["grpo", "--config", "configs/rl_toy.yaml", "group_size=1"], "group_size"),
    (["grpo", "--config", "configs/rl_toy.yaml", "stepz=3"], "stepz"),
    (["distill", "--config", "configs/rl_distill_toy.yaml"], "teacher=PATH"),
    (["distill", "--config", "configs/rl_distill_toy.yaml", "teacher=/nonexistent/teacher"], "/nonexistent/teacher"),
    (["distill", "--config", "configs/rl_distill_toy.yaml", "sft.stepz=3"], "stepz"),
    (["distill", "--config", "configs/rl_distill_toy.yaml", "sft.model.hidden_size=8"], "top-level 'model:'"),
])
def test_bad_input_exits_2_naming_it(tmp_path, capsys, argv, msg):
    rc = main(argv[:1] + ["--workdir", str(tmp_path / "w")] + argv[1:])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert msg in err and f"dsjax {argv[0]}: error:" in err


def test_bad_jsonl_lines_name_file_and_line(tmp_path, capsys):
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                    '{"messages": [{"role": "user", "content": "no answer"}]}\n')
    assert main(["sft", "--workdir", str(tmp_path / "w"), f"data={chat}"]) == 2
    assert f"{chat}:2" in capsys.readouterr().err
    probs = tmp_path / "p.jsonl"
    probs.write_text('{"question": "1+1?", "answer": 2}\nnot json\n')
    assert main(["grpo", "--workdir", str(tmp_path / "g"), f"task={probs}"]) == 2
    assert f"{probs}:2: invalid JSON" in capsys.readouterr().err


def test_plot_without_matplotlib_warns_and_writes_nothing(tmp_path, monkeypatch):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1, "reward": 0.5}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        assert plot_grpo(str(metrics), str(tmp_path / "grpo.png")) is None
    assert not os.path.exists(tmp_path / "grpo.png")
