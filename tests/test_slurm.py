"""reproduce.py --slurm on a real Slurm: munged, slurmctld and slurmd for one node on localhost (Debian's slurmctld,
slurmd, slurm-client and munge; .ci/run installs them), each generated script submitted as reproduce.py prints it, a
tiny grid (tiny random CLIP in OpenAI's format, tiny folder datasets, CPU, --gpus-per-task 0) run to a complete report.
The test cluster's MaxArraySize is 2: a grid of 4 tasks must go in chunks."""
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time

import pytest

import reproduce
from conftest import make_tiny_clip, save_state_dict, write_colour_folder

SBIN = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
PROGRAMS = ["sbatch", "squeue", "scancel", "scontrol", "sinfo", "munged", "slurmctld", "slurmd"]
ABSENT = [p for p in PROGRAMS if not shutil.which(p, path=SBIN)]
pytestmark = [
    pytest.mark.skipif(bool(ABSENT), reason=f"Slurm is not installed ({', '.join(ABSENT)} absent): "
                       "apt-get install slurmctld slurmd slurm-client munge"),
    pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() != 0, reason="slurmd starts jobs as their user: needs root"),
]


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
NodeName=testnode NodeHostname={socket.gethostname()} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=test Nodes=testnode Default=YES MaxTime=INFINITE State=UP
""")
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


def test_a_grid_larger_than_max_array_size_runs_as_generated(cluster, grid, tmp_path, capsys):
    out, script = str(tmp_path / "out"), str(tmp_path / "runs.sh")
    argv = ["upt-fig4", "--datasets", grid["datasets"][0], "--shots", "1", "--seeds", "1,2,3", "--backbone",
            grid["backbone"], "--epochs", "1", "--batch-size", "4", "--workers", "0", "--precision", "fp32",
            "--root", grid["root"], "--output-dir", out]
    slurm = ["--slurm", script, "--gpus-per-task", "0", "--cpus-per-task", "1", "--max-array", "2"]
    reproduce.main(argv + slurm)
    printed = capsys.readouterr().out
    lines = submit_lines(printed)
    assert "13 runs to do (0 of 13 done), in 4 array tasks" in printed
    assert lines == [f"sbatch {script}", f"sbatch --array=0-1 {script} 2"]
    refused = subprocess.run(["sbatch", "--array=0-3", script], env=cluster, capture_output=True, text=True)
    assert refused.returncode != 0  # the whole array at once is over this cluster's MaxArraySize
    wait([sbatch(line, cluster) for line in lines], cluster)

    recipe = reproduce.with_options("upt-fig4", reproduce.build("upt-fig4", reproduce.parse_args(argv)),
                                    reproduce.parse_args(argv))
    jobs, _ = reproduce.plan_recipe("upt-fig4", recipe, grid["root"], out)
    results = reproduce.read_results(out)
    assert len(jobs) == 13 and reproduce.pending(jobs, results) == []  # every run's every row
    task_logs = sorted(f for f in os.listdir(os.path.join(out, "logs")) if f.startswith("slurm-"))
    assert len(task_logs) == 4
    text = "".join(open(os.path.join(out, "logs", f)).read() for f in task_logs)
    for job in jobs:  # each task's log names each of its commands and the run's own log, which starts with it
        log = os.path.join(out, "logs", f"{job['id']}.log")
        assert f"> {log}" in text and open(log).readline().startswith(f"$ {shlex.quote(sys.executable)} ")
    assert text.count("exit 0") == 13
    reproduce.main(argv + ["--report"])
    assert "complete: every cell has all its runs" in capsys.readouterr().out


def test_a_cancelled_task_is_the_only_one_regenerated(cluster, grid, tmp_path, capsys):
    out, script = str(tmp_path / "out"), str(tmp_path / "runs.sh")
    argv = ["rethinking-table1", "--datasets", ",".join(grid["datasets"]), "--backbone", grid["backbone"],
            "--workers", "0", "--root", grid["root"], "--output-dir", out]
    slurm = ["--slurm", script, "--gpus-per-task", "0", "--cpus-per-task", "1"]
    reproduce.main(argv + slurm)
    [line] = submit_lines(capsys.readouterr().out)
    job = sbatch(line, cluster, "--hold")
    subprocess.run(["scancel", f"{job}_1"], env=cluster, check=True)  # the second dataset's task
    subprocess.run(["scontrol", "release", job], env=cluster, check=True)
    wait([job], cluster)

    reproduce.main(argv + slurm)
    printed = capsys.readouterr().out
    assert "4 runs to do (4 of 8 done), in 1 array tasks" in printed
    text = open(script).read()
    assert text.count("train.py --method zeroshot") == 4 and grid["datasets"][0] + " " not in text
    assert text.count(f"--dataset {grid['datasets'][1]} ") == 4
    [line] = submit_lines(printed)
    wait([sbatch(line, cluster)], cluster)
    reproduce.main(argv + ["--report"])
    assert "complete: every cell has all its runs" in capsys.readouterr().out
    reproduce.main(argv + slurm)
    assert "nothing to do: all 8 runs are done; no script written" in capsys.readouterr().out
