"""reproduce.py --slurm on a real Slurm: munged, slurmctld and slurmd for one node on localhost (Debian's slurmctld,
slurmd, slurm-client and munge; .ci/run installs them), each generated script submitted as reproduce.py prints it, a
tiny grid (tiny random CLIP in OpenAI's format, tiny folder datasets, CPU, --gpus-per-task 0) run to a complete report.
The test cluster's MaxArraySize is 2, so a grid of 3 tasks must go in chunks; its one node declares 8 CPUs and a GPU
(/dev/null), so that every built-in recipe's script, at the paper's size and with the default resources, is accepted
(sbatch --test-only)."""
import argparse
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

import reproduce
from conftest import make_tiny_clip, save_state_dict, write_colour_folder

SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
PROGRAMS = ["sbatch", "squeue", "scancel", "scontrol", "sinfo", "munged", "slurmctld", "slurmd"]
ABSENT = [p for p in PROGRAMS if not shutil.which(p, path=SBIN)]
needs_slurm = [
    pytest.mark.skipif(bool(ABSENT), reason=f"Slurm is not installed ({', '.join(ABSENT)} absent): "
                       "apt-get install slurmctld slurmd slurm-client munge"),
    pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() != 0,
                       reason="slurmd starts jobs as their user: needs root"),
]


def needs_cluster(test):
    for mark in needs_slurm:
        test = mark(test)
    return test


# ----------------------------------------------------------------------------------------------------------------------
# Tasks, chunks, directives

def test_runs_of_one_training_subset_share_a_task_longest_budget_first():
    jobs, _ = reproduce.plan_recipe("rethinking-fig1", reproduce.RECIPES["rethinking-fig1"], "/data", "/out")
    tasks = reproduce.tasks_of(jobs)
    assert len(tasks) == 11 * 5 * 3 + 11 and sum(map(len, tasks)) == len(jobs) == 3146
    for task in tasks:
        assert len({j["subset"] for j in task}) == 1
        assert [j["epochs"] for j in task] == sorted((j["epochs"] for j in task), reverse=True)
    trained = [t for t in tasks if t[0]["epochs"]]
    assert {len(t) for t in trained} == {19} and [j["epochs"] for j in trained[0]] == [200] * 6 + [100] * 6 + \
        [50] * 6 + [0]  # 9 CoOp and 9 FT grid points, then the linear probe (no epochs)
    assert {len(t) for t in tasks if not t[0]["epochs"]} == {1}  # zero-shot: once per dataset
    jobs, _ = reproduce.plan_recipe("rethinking-table2", reproduce.RECIPES["rethinking-table2"], "/data", "/out")
    assert [len(t) for t in reproduce.tasks_of(jobs)] == [4 + 2 * 10] * 11  # a dataset's zero-shot runs: one task
    jobs, _ = reproduce.plan_recipe("upt-fig1", reproduce.RECIPES["upt-fig1"], "/data", "/out")
    short = [t for t in reproduce.tasks_of(jobs) if not t[0]["epochs"]]
    assert len(short) == 11 and all([j["command"][1] for j in t] == ["variance.py", "train.py"] for t in short)


def test_chunks_start_at_index_0_and_the_script_adds_the_offset():
    assert reproduce.chunks(2500, 1000) == [(0, 1000), (1000, 1000), (2000, 500)]
    assert reproduce.chunks(1000, 1000) == [(0, 1000)] and reproduce.chunks(1, 1000) == [(0, 1)]
    assert reproduce.submit_lines("my runs.sh", 2500, 1000, throttle=50) == [
        "sbatch 'my runs.sh'", "sbatch --array=0-999%50 'my runs.sh' 1000", "sbatch --array=0-499%50 'my runs.sh' 2000"]
    opts = argparse.Namespace(**dict(reproduce.SLURM, throttle=50))
    assert reproduce.sbatch_lines("x", 2500, "/o", opts)[1] == "#SBATCH --array=0-999%50"
    assert reproduce.sbatch_lines("x", 7, "/o", opts)[1] == "#SBATCH --array=0-6%50"


def test_sbatch_directives_from_the_options():
    def directives(**options):
        return [line.removeprefix("#SBATCH ") for line in
                reproduce.sbatch_lines("job", 3, "/o", argparse.Namespace(**dict(reproduce.SLURM, **options)))]

    tail = ["--output=/o/logs/slurm-%A_%a.log", "--open-mode=append"]
    assert directives() == ["--job-name=job", "--array=0-2", "--gres=gpu:1", "--cpus-per-task=8", *tail]
    assert directives(gpus_per_task=0, cpus_per_task=2) == ["--job-name=job", "--array=0-2", "--cpus-per-task=2", *tail]
    assert directives(gres="gpu:a100:1", gpus_per_task=None, partition="gpu", time="2-00:00:00", account="lab",
                      sbatch="--qos=high --mem 64G -C 'a100|h100'") == [
        "--job-name=job", "--array=0-2", "--gres=gpu:a100:1", "--cpus-per-task=8", "--partition=gpu",
        "--time=2-00:00:00", "--account=lab", "--qos=high", "--mem 64G", "-C 'a100|h100'", *tail]


# ----------------------------------------------------------------------------------------------------------------------
# A real one-node Slurm


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node Slurm on localhost, its own munge key and socket, ports, spool and state folders: -> the env that
    points sbatch, squeue, ... at it (SLURM_CONF). The daemons are stopped by PID at the end."""
    d = tmp_path_factory.mktemp("slurm")
    for sub in ("munge", "spool", "state", "log"):
        (d / sub).mkdir(mode=0o700)
    (d / "munge" / "key").write_bytes(os.urandom(1024))
    os.chmod(d / "munge" / "key", 0o600)
    socket_path = d / "munge" / "socket"
    (d / "slurm.conf").write_text(f"""ClusterName=test
SlurmctldHost=localhost(127.0.0.1)
GresTypes=gpu
SlurmdParameters=config_overrides
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MaxArraySize=2
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerParameters=sched_interval=1
NodeName=testnode NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 CPUs=8 Gres=gpu:1 State=UNKNOWN
PartitionName=test Nodes=testnode Default=YES MaxTime=INFINITE State=UP
""")
    (d / "gres.conf").write_text("NodeName=testnode Name=gpu File=/dev/null\n")
    env = dict(os.environ, SLURM_CONF=str(d / "slurm.conf"), PATH=SBIN)
    which = lambda p: shutil.which(p, path=SBIN)
    daemons = []
    try:
        for argv in ([which("munged"), "-F", "--force", f"--socket={socket_path}", f"--key-file={d}/munge/key",
                      f"--pid-file={d}/munge/pid", f"--seed-file={d}/munge/seed", f"--log-file={d}/log/munged.log"],
                     [which("slurmctld"), "-D", "-i"], [which("slurmd"), "-D", "-N", "testnode"]):
            with open(d / "log" / f"{os.path.basename(argv[0])}.out", "w") as log:
                daemons.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
            time.sleep(0.5)
        deadline = time.time() + 30
        while sinfo(env) != "idle":
            if time.time() > deadline or any(p.poll() is not None for p in daemons):
                logs = "\n".join(f.read_text()[-800:] for f in sorted((d / "log").iterdir()))
                if any(p.poll() is not None for p in daemons):  # this machine cannot run the daemons (no cgroups, ...)
                    pytest.skip(f"a Slurm daemon could not start here:\n{logs}")
                pytest.fail(f"the test cluster did not come up (sinfo: {sinfo(env)!r}):\n{logs}")
            time.sleep(0.5)
        yield env
    finally:
        for p in reversed(daemons):  # by PID: only the daemons this test started
            p.terminate()
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def sinfo(env):
    return subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout.strip()


def sbatch(line, env, *options):
    """Submit one printed `sbatch ...` line as it is (with `options` added): -> the job id."""
    argv = shlex.split(line)
    done = subprocess.run([argv[0], "--parsable", *options, *argv[1:]], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().split(";")[0]


def wait(job_ids, env, timeout=240):
    """Until no task of the jobs is pending or running."""
    deadline = time.time() + timeout
    while subprocess.run(["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i %T"], env=env, capture_output=True,
                         text=True).stdout.strip():
        assert time.time() < deadline, f"jobs {job_ids} still queued after {timeout} s"
        time.sleep(1)


def submit_lines(out):
    lines = out.splitlines()
    start = lines.index("submit it with:") + 1
    return [line.strip() for line in lines[start:] if line.startswith("  sbatch ")]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    d = tmp_path_factory.mktemp("grid")
    save_state_dict(make_tiny_clip("vit"), str(d / "tiny.pt"))
    a = write_colour_folder(str(d / "a"))
    b = write_colour_folder(str(d / "b"), colours={"cyan_sea": (30, 220, 220), "pink_rose": (240, 120, 200)})
    return dict(backbone=str(d / "tiny.pt"), datasets=[a, b], root=str(d))


@needs_cluster
def test_a_grid_runs_as_generated_in_chunks_and_a_cancelled_task_is_the_only_one_regenerated(cluster, grid,
                                                                                           tmp_path, capsys):
    out, script = str(tmp_path / "out"), str(tmp_path / "runs.sh")
    argv = ["upt-fig4", "--datasets", grid["datasets"][0], "--shots", "1", "--seeds", "1,2", "--backbone",
            grid["backbone"], "--epochs", "1", "--batch-size", "4", "--workers", "0", "--precision", "fp32",
            "--root", grid["root"], "--output-dir", out]
    slurm = ["--slurm", script, "--gpus-per-task", "0", "--cpus-per-task", "1", "--max-array", "2"]
    reproduce.main(argv + slurm)
    printed = capsys.readouterr().out
    assert "9 runs to do (0 of 9 done), in 3 array tasks" in printed  # zero-shot; 4 methods x seed 1; x seed 2
    lines = submit_lines(printed)
    assert lines == [f"sbatch {script}", f"sbatch --array=0-0 {script} 2"]
    refused = subprocess.run(["sbatch", "--array=0-2", script], env=cluster, capture_output=True, text=True)
    assert refused.returncode != 0  # the whole array at once is over this cluster's MaxArraySize
    first = sbatch(lines[0], cluster, "--hold")
    subprocess.run(["scancel", f"{first}_0"], env=cluster, check=True)  # task 0 (zero-shot), while pending
    subprocess.run(["scontrol", "release", first], env=cluster, check=True)
    wait([first, sbatch(lines[1], cluster)], cluster)

    args = reproduce.parse_args(argv)
    jobs, _ = reproduce.plan_recipe("upt-fig4", reproduce.with_options("upt-fig4", reproduce.build("upt-fig4", args),
                                                                       args), grid["root"], out)
    tasks = reproduce.tasks_of(jobs)
    assert reproduce.pending(jobs, reproduce.read_results(out)) == tasks[0]  # every other run has all its rows
    logs = {f: open(os.path.join(out, "logs", f)).read() for f in os.listdir(os.path.join(out, "logs"))
            if f.startswith("slurm-")}
    assert len(logs) == 2 and "".join(logs.values()).count(" exit 0\n") == 8
    for job in tasks[1] + tasks[2]:  # a task's log names each command and the run's log, which starts with it
        log = os.path.join(out, "logs", f"{job['id']}.log")
        assert sum(f"> {log}\n" in text for text in logs.values()) == 1
        assert open(log).readline().startswith(f"$ {shlex.quote(sys.executable)} train.py --method ")

    reproduce.main(argv + slurm)  # regenerated: the cancelled task only
    printed = capsys.readouterr().out
    assert "1 runs to do (8 of 9 done), in 1 array tasks" in printed
    assert open(script).read().count("\n  run ") == 1 and tasks[0][0]["id"] in open(script).read()
    [line] = submit_lines(printed)
    wait([sbatch(line, cluster)], cluster)
    reproduce.main(argv + ["--report"])
    assert "complete: every cell has all its runs" in capsys.readouterr().out
    reproduce.main(argv + slurm)
    assert "nothing to do: all 9 runs are done; no script written" in capsys.readouterr().out


@needs_cluster
def test_every_recipe_s_script_is_accepted_at_the_paper_s_size(cluster, tmp_path):
    """The default resources (a GPU per task, 8 CPUs) with a partition and a time limit, in chunks of MaxArraySize."""
    opts = argparse.Namespace(**dict(reproduce.SLURM, partition="test", time="1-00:00:00", max_array=2))
    for name, recipe in reproduce.RECIPES.items():
        jobs, _ = reproduce.plan_recipe(name, recipe, "/data", str(tmp_path / "out"))
        tasks, script = reproduce.tasks_of(jobs), str(tmp_path / f"{name}.sh")
        reproduce.write_slurm(script, name, tasks, str(tmp_path / "out"), opts, f"python reproduce.py {name} ...")
        lines = reproduce.submit_lines(script, len(tasks), 2)
        for line in {lines[0], lines[-1]}:
            argv = shlex.split(line)
            done = subprocess.run([argv[0], "--test-only", *argv[1:]], env=cluster, capture_output=True, text=True)
            assert done.returncode == 0 and "to start at" in done.stderr, (name, line, done.stderr)


@needs_cluster
def test_a_cancelled_run_keeps_its_checkpoint_and_the_regenerated_task_continues_it(cluster, grid, tmp_path,
                                                                                    monkeypatch, capsys):
    """scancel sends SIGTERM: the run says where its checkpoint is; the next script's task resumes it."""
    coop = ["coop", "--n-ctx", 2, "--epochs", 50, "--batch-size", 4, "--workers", 0, "--precision", "fp32"]
    recipe = dict(title="one long run", tables=[],
                  runs=reproduce.few_shot({"CoOp": coop}, grid["datasets"][1:], [1], [1], grid["backbone"]))
    monkeypatch.setitem(reproduce.RECIPES, "long", recipe)
    out, script = str(tmp_path / "out"), str(tmp_path / "runs.sh")
    argv = ["long", "--root", grid["root"], "--output-dir", out, "--slurm", script, "--gpus-per-task", "0",
            "--cpus-per-task", "1"]
    reproduce.main(argv)
    [line] = submit_lines(capsys.readouterr().out)
    [job] = reproduce.plan_recipe("long", recipe, grid["root"], out)[0]
    log, job_id = os.path.join(out, "logs", f"{job['id']}.log"), sbatch(line, cluster)
    deadline = time.time() + 120
    while not (os.path.isfile(log) and "\nepoch 2/50 |" in open(log).read()):
        assert time.time() < deadline, "the run did not reach epoch 2"
        time.sleep(0.2)
    subprocess.run(["scancel", job_id], env=cluster, check=True)
    wait([job_id], cluster)
    saved = torch.load(job["checkpoint"], weights_only=True)["epoch"]
    assert 1 <= saved < 50
    assert f"terminated (SIGTERM): {job['checkpoint']} holds epoch {saved}; add --resume" in open(log).read()

    reproduce.main(argv)  # the run has no row: it is in the new script, and its task continues the checkpoint
    [line] = submit_lines(capsys.readouterr().out)
    wait([sbatch(line, cluster)], cluster)
    assert f"resumed from {job['checkpoint']} at epoch {saved} of 50" in open(log).read()
    assert reproduce.pending([job], reproduce.read_results(out)) == []
