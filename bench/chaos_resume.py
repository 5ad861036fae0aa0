"""Kill -9 a whole ``recipes.pretrain`` launch, torchrun and every rank, at random moments of a
TP=2 run with dropout on, resume it each time, and compare with the uninterrupted run.

    python bench/chaos_resume.py [--kills 20] [--seed S] [--distributed-optimizer] [--iters 40]
        [--out DIR]

The run: llama2-tiny at TP=2 (DP=2 with ``--distributed-optimizer``: ZeRO-1 needs a data-parallel
group to shard over), dropout 0.1, a save every 4 iterations and an evaluation every 3, so a
moment can fall in a step, a save or an evaluation.  Each kill waits for the log line of a random
iteration among the next six past the checkpoint it resumed from, then a random 0-0.8 s more
(or, for "the next zero", 1-12 s into the launch: imports, process groups, the load), and kills
the whole process tree (torchrun gives each rank a process group of its own, so killing torchrun's group
would leave the ranks running and writing into the same folder, as no node failure does).

Checked, else the exit status is 1 and the failing check is printed:
- the resumed run's metrics file holds each iteration once, and every loss and gradient norm
  equals the uninterrupted run's, bit for bit (fp32, CPU);
- no process of a killed launch is alive 5 s after the kill;
- every launch loaded the iteration "latest" named when it started, from a complete folder
  (never an ``iter_*.tmp``, never a folder without its torch_dist metadata).

A table of the kills (the last line each launch printed: the phase the kill fell in) and a
summary end the run.  The seed is printed; without ``--seed`` one is drawn.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT.parent / "shared" / "fixtures"
ITERATION = re.compile(r"^iteration\s+(\d+)/")
LOADED = re.compile(r"^loaded (\S+) \((?:DeepSpeed, )?iteration (\d+)\)")


def pretraining_data(work: Path) -> tuple:
    """The Alpaca sample's responses in stories260K's tokenizer (what the tests train on)."""
    sys.path.insert(0, str(ROOT))
    from recipes.data import preprocess_data

    tok = FIXTURES / "stories260K" / "tokenizer.model"
    preprocess_data.main(["--input", str(FIXTURES / "alpaca" / "alpaca_data_sample.json"), "--tokenizer-name-or-path",
                          str(tok), "--output-prefix", str(work / "alpaca"), "--json-keys", "output", "--append-eod"])
    return str(work / "alpaca_output_document"), str(tok)


def command(data: tuple, iters: int, distopt: bool, save: Path, ds_config: Path = None) -> list:
    prefix, tok = data
    if ds_config is not None:  # DeepSpeed's engine, ZeRO over DP=2 (it refuses --eval-interval: not built there)
        layout = ["--deepspeed", "--deepspeed_config", str(ds_config)]
    else:
        layout = ["--use-distributed-optimizer"] if distopt else ["--tensor-model-parallel-size", "2"]
        layout += ["--eval-interval", "3", "--eval-iters", "1"]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port",
            str(_free_port()), "-m", "recipes.pretrain", "--model", "llama2-tiny", "--data-path", prefix,
            "--tokenizer-name-or-path", tok, "--seq-length", "64", "--train-iters", str(iters), *layout,
            "--hidden-dropout", "0.1", "--attention-dropout", "0.1", "--log-interval", "1",
            "--save-interval", "4", "--save", str(save),
            "--load", str(save)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
                OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


class Launch:
    """One launch, its output read line by line on a thread (so a kill never waits on a pipe)."""

    def __init__(self, cmd: list, log: Path):
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.lines, self.iteration, self.loaded = [], 0, None
        self.log = open(log, "a")
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.log.write(line)
            line = line.strip()
            self.lines.append(line)
            m = ITERATION.match(line)
            if m:
                self.iteration = int(m.group(1))
            m = LOADED.match(line)
            if m:
                self.loaded = int(m.group(2))

    def tree(self) -> list:
        try:
            parent = psutil.Process(self.proc.pid)
            return [parent] + parent.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill_tree(self) -> list:
        """SIGKILL torchrun and every process under it, as a node failure would: their pids."""
        procs = self.tree()
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        self.proc.wait()
        self.reader.join(timeout=10)
        self.log.close()
        return [p.pid for p in procs]

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        self.log.close()
        return rc


def alive(pids) -> list:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def latest(save: Path):
    tracker = save / "latest_checkpointed_iteration.txt"
    return int(tracker.read_text()) if tracker.is_file() else None


def complete(save: Path, iteration: int) -> bool:
    folder = save / f"iter_{iteration:07d}"
    written = (folder / ".metadata").is_file() or any(folder.glob("*model_states.pt"))  # torch_dist or DeepSpeed
    return folder.is_dir() and written and (folder / "args.json").is_file()


def metrics(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run(kills: int, seed: int, distopt: bool, iters: int, work: Path, zero: int = None) -> int:
    rng = random.Random(seed)
    data = pretraining_data(work)
    name = (f"DeepSpeed ZeRO-{zero}, DP=2" if zero is not None else "distributed optimizer, DP=2" if distopt
            else "TP=2")
    ds_config = None
    if zero is not None:  # the shipped tiny config at this stage
        cfg = json.loads((ROOT / "recipes" / "deepspeed_configs" / "llama2-tiny.json").read_text())
        cfg["zero_optimization"]["stage"] = zero
        ds_config = work / f"ds_zero{zero}.json"
        ds_config.write_text(json.dumps(cfg))
    print(f"chaos: {kills} kills, seed {seed}, {name}, {iters} iterations, dropout 0.1; work in {work}", flush=True)

    ref = Launch(command(data, iters, distopt, work / "reference", ds_config), work / "reference.log")
    if ref.wait(timeout=900) != 0:
        print("the uninterrupted run failed:\n" + "\n".join(ref.lines[-30:]))
        return 1
    reference = {r["iteration"]: (r["loss"], r.get("grad_norm")) for r in metrics(work / "reference" / "metrics.jsonl")}

    save, failures, rows, started = work / "chaos", [], [], time.time()
    made = 0
    for k in range(1, kills + 1):
        before = latest(save) or 0
        if before >= iters:  # a kill fell after the last save: the run is done
            print(f"kill {k}/{kills}: none left to make, the run ended at iteration {before}", flush=True)
            break
        # a moment in the next few iterations past the resume point (the run must outlast N kills);
        # target == before: during the launch itself (imports, process groups, the checkpoint load)
        target = min(iters, before + rng.randint(0, 6))
        launch = Launch(command(data, iters, distopt, save, ds_config), work / "chaos.log")
        if target == before:
            time.sleep(rng.uniform(1.0, 12.0))
        else:
            deadline = time.time() + 600
            while launch.iteration < target and launch.proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.8))
        finished = launch.proc.poll() is not None
        pids = launch.kill_tree()
        made += not finished
        time.sleep(5)
        survivors = alive(pids)
        if survivors:
            failures.append(f"kill {k}: alive 5 s after the kill: {survivors}")
            for pid in survivors:
                os.kill(pid, signal.SIGKILL)
        if launch.loaded is not None and launch.loaded != before:
            failures.append(f"kill {k}: latest named iteration {before}, the launch loaded {launch.loaded}")
        after = latest(save)
        if after is not None and not complete(save, after):
            failures.append(f"kill {k}: latest names iteration {after}, whose folder is incomplete")
        last = next((line for line in reversed(launch.lines) if line), "(nothing printed)")
        rows.append((k, before, target, launch.iteration, after, "ended before the kill" if finished else last[:70]))
        eta = (time.time() - started) / k * (kills - k)
        print(f"kill {k}/{kills}: resumed from {before}, killed after iteration {launch.iteration} "
              f"(target {target}); latest now {after}; ETA {eta:.0f} s", flush=True)

    if made < kills:
        failures.append(f"{made} of the {kills} kills fell in a running launch (the run ended first): give more --iters")
    before = latest(save) or 0
    final = Launch(command(data, iters, distopt, save, ds_config), work / "chaos.log")
    if final.wait(timeout=900) != 0:
        failures.append("the final launch failed:\n" + "\n".join(final.lines[-30:]))
    elif (final.loaded or 0) != before:
        failures.append(f"final launch: latest named iteration {before}, it loaded {final.loaded}")
    records = metrics(save / "metrics.jsonl") if (save / "metrics.jsonl").is_file() else []
    seen = [r["iteration"] for r in records]
    if seen != list(range(1, iters + 1)):
        failures.append(f"the metrics file's iterations are {seen}, not 1..{iters} once each")
    differ = [(r["iteration"], (r["loss"], r.get("grad_norm")), reference.get(r["iteration"])) for r in records
              if (r["loss"], r.get("grad_norm")) != reference.get(r["iteration"])]
    if differ:
        failures.append(f"{len(differ)} iterations differ from the uninterrupted run, first {differ[:3]}")

    print("\n| kill | resumed from | target iteration | last iteration logged | latest after | last line before the kill |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    print(f"\nsummary: {made} of {kills} kills in a running launch (seed {seed}, {name}); {len(records)} iterations logged once each: "
          f"{'yes' if seen == list(range(1, iters + 1)) else 'no'}; equal to the uninterrupted run: "
          f"{'yes' if records and not differ else 'no'}; {time.time() - started:.0f} s")
    for f in failures:
        print(f"FAILED: {f}")
    print("chaos: " + ("passed" if not failures else f"{len(failures)} check(s) failed"), flush=True)
    return 1 if failures else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=None, help="the kill moments' seed (default: drawn, and printed)")
    p.add_argument("--distributed-optimizer", action="store_true", help="DP=2 with --use-distributed-optimizer")
    p.add_argument("--deepspeed-zero-stage", type=int, choices=(0, 1, 2, 3), default=None,
                   help="the DeepSpeed engine at this ZeRO stage, DP=2 (no evaluations: not built there)")
    p.add_argument("--iters", type=int, default=80, help="enough to outlast the kills (about 3 per kill)")
    p.add_argument("--out", default=None, help="work folder (default: a temporary one, removed)")
    args = p.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2 ** 31)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        return run(args.kills, seed, args.distributed_optimizer, args.iters, Path(args.out), args.deepspeed_zero_stage)
    with tempfile.TemporaryDirectory() as d:
        return run(args.kills, seed, args.distributed_optimizer, args.iters, Path(d), args.deepspeed_zero_stage)


if __name__ == "__main__":
    sys.exit(main())
