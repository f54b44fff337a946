"""Crash and race evidence, as figures: SIGKILL the real CLI mid-write, race it, fill its disk.

A maintainer benchmark, not a test. It drives ``clipzoo`` in subprocesses on a small zoo built on
the embedded tiny backbone with built-in synthetic data, and after every disturbance checks that
``clipzoo verify`` passes, that the bytes of the experts that existed before are unchanged, that
the registry holds the change fully or not at all, and that the next command works::

    python -m clipzoo.bench.stress --out /tmp/stress-out [--kills 20] [--races 2] [--json]

Writes ``OUT/stress.json`` and ``OUT/stress.md``; exits 1 if any trial was inconsistent.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

EPOCHS = "2"
BASE = {"shapes": "builtin:shapes", "colours": "builtin:colours"}  # the template zoo's experts
NEW, NEW_DATA, VICTIM = "textures", "builtin:textures", "colours"
RACERS = {"r-digits": "builtin:digits", "r-textures": "builtin:textures", "r-shapes": "builtin:shapes",
          "r-colours": "builtin:colours"}
DISK_MARGINS_KB = (8, 100, 360, 830, 1500)  # free space left on the tmpfs before add-task


def tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (empty when it is missing)."""
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def diff(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Files added, removed or changed between two :func:`tree` results."""
    return ([f"+{k}" for k in after.keys() - before.keys()] + [f"-{k}" for k in before.keys() - after.keys()]
            + [f"~{k}" for k in before.keys() & after.keys() if before[k] != after[k]])


def registry(zoo: Path) -> dict:
    return json.loads((zoo / "registry.json").read_text())


def one_line_error(stderr: str) -> str | None:
    """Why ``stderr`` is not one line ``error: ...`` (None when it is)."""
    lines = stderr.strip().splitlines() or [""]
    if len(lines) == 1 and lines[0].startswith("error: "):
        return None
    return f"stderr is not one 'error:' line but {len(lines)} lines, first {lines[0][:120]!r}, last {lines[-1][-200:]!r}"


class Stress:
    """The scenarios; each returns a summary dict with trials, consistent and failures."""

    def __init__(self, out: Path, quiet: bool):
        self.out, self.quiet = out, quiet
        self.exe = str(Path(sys.executable).with_name("clipzoo"))
        if not Path(self.exe).exists():
            self.exe = shutil.which("clipzoo") or "clipzoo"
        self.env = {**os.environ, "CLIPZOO_CACHE": str(out / "cache"), "CLIPZOO_DISABLE_PROGRESS_BARS": "1"}
        self.image = out / "one.png"
        self.template = out / "template"
        self.work = out / "work"

    def log(self, msg: str) -> None:
        if not self.quiet:
            print(msg, file=sys.stderr, flush=True)

    # ----- running the CLI --------------------------------------------------------------------
    def popen(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen([self.exe, *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def cli(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([self.exe, *args], env=self.env, capture_output=True, text=True, timeout=timeout)

    def must(self, *args: str) -> subprocess.CompletedProcess:
        r = self.cli(*args)
        if r.returncode:
            raise RuntimeError(f"clipzoo {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-600:]}")
        return r

    def add_args(self, zoo: Path, name: str = NEW, data: str = NEW_DATA) -> list[str]:
        return ["add-task", "--zoo", str(zoo), "--name", name, "--data", data, "--epochs", EPOCHS]

    def predict_problem(self, zoo: Path) -> str | None:
        r = self.cli("predict", "--zoo", str(zoo), "--json", str(self.image))
        return None if r.returncode == 0 else f"predict exit {r.returncode}: {r.stderr.strip()[-300:]}"

    def verify_problem(self, zoo: Path) -> str | None:
        r = self.cli("verify", "--zoo", str(zoo))
        return None if r.returncode == 0 else f"verify exit {r.returncode}: {(r.stdout + r.stderr).strip()[-400:]}"

    # ----- set-up -------------------------------------------------------------------------------
    def setup(self) -> None:
        """The template zoo (two experts) and one image to predict; warms the feature cache."""
        from clipzoo.tasks.synthetic import render

        self.out.mkdir(parents=True, exist_ok=True)
        render("shapes", "circle", 0, "test").save(self.image)
        shutil.rmtree(self.template, ignore_errors=True)
        self.must("init", "--zoo", str(self.template))
        for name, data in BASE.items():
            self.must(*self.add_args(self.template, name, data))
        warm = self.out / "warm"   # encode every built-in domain once, so timings are those of cached features
        shutil.rmtree(warm, ignore_errors=True)
        shutil.copytree(self.template, warm)
        for data in sorted(set(RACERS.values()) - set(BASE.values())):
            self.must(*self.add_args(warm, data.split(":")[1], data))
        shutil.rmtree(warm)

    def fresh(self, where: Path | None = None) -> Path:
        zoo = where or self.work
        shutil.rmtree(zoo, ignore_errors=True)
        shutil.copytree(self.template, zoo)
        return zoo

    # ----- 1. kill tests --------------------------------------------------------------------------
    def kills(self, label: str, argv: Callable[[Path], list[str]], change: Callable[[dict, dict], bool],
              rerun: Callable[[Path], list[str]] | None, n: int) -> dict:
        """SIGKILL ``argv`` at i/(n+1) of its undisturbed duration; ``change(pre, post)`` says the
        registry holds the command's whole change; ``rerun`` is the next command when it did not."""
        zoo = self.fresh()
        t0 = time.perf_counter()
        self.must(*argv(zoo))
        duration = time.perf_counter() - t0
        self.log(f"[{label}] undisturbed run: {duration:.1f}s; {n} kills spread over it")
        res: dict = {"trials": 0, "consistent": 0, "undisturbed_s": round(duration, 2), "landed": 0,
                     "not_landed": 0, "finished_before_kill": 0, "litter": 0, "failures": []}
        for i in range(1, n + 1):
            zoo = self.fresh()
            pre_reg, pre_files = registry(zoo), {e: tree(zoo / "experts" / e) for e in registry(zoo)["experts"]}
            pre_unnamed = set(self.unnamed(zoo))
            at = duration * i / (n + 1)
            proc, t0 = self.popen(*argv(zoo)), time.perf_counter()
            try:
                proc.communicate(timeout=at)
                res["finished_before_kill"] += 1
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.communicate()
            killed_at = time.perf_counter() - t0
            problems, state = self.after_kill(zoo, pre_reg, pre_files, change, rerun, argv)
            res["trials"] += 1
            res["landed"] += state == "new"
            res["not_landed"] += state == "old"
            litter = sorted(set(self.unnamed(zoo)) - pre_unnamed)
            res["litter"] += bool(litter)
            res.setdefault("litter_examples", []).extend(litter[:2] if len(res.get("litter_examples", [])) < 6 else [])
            if problems:
                res["failures"].append({"trial": i, "killed_at_s": round(killed_at, 2), "state": state,
                                        "problems": problems, "litter": litter})
            else:
                res["consistent"] += 1
            self.log(f"[{label}] kill {i}/{n} at {killed_at:.1f}s: registry {state}, "
                     + ("consistent" if not problems else "INCONSISTENT: " + "; ".join(problems)))
        return res

    def after_kill(self, zoo: Path, pre_reg: dict, pre_files: dict, change: Callable[[dict, dict], bool],
                   rerun: Callable[[Path], list[str]] | None, argv: Callable[[Path], list[str]]) -> tuple[list[str], str]:
        problems: list[str] = []
        try:
            post = registry(zoo)
        except (OSError, ValueError) as e:
            return [f"registry.json unreadable: {e}"], "unreadable"
        state = "old" if post == pre_reg else "new" if change(pre_reg, post) else "partial"
        if state == "partial":
            problems.append(f"registry holds part of the change: experts {sorted(post['experts'])} "
                            f"router v{post['router']['version']} (before: {sorted(pre_reg['experts'])} "
                            f"v{pre_reg['router']['version']})")
        for name, files in pre_files.items():
            if name in post["experts"] and (d := diff(files, tree(zoo / "experts" / name))):
                problems.append(f"old expert {name} changed: {', '.join(d)}")
        if state == "old" and rerun is not None:   # the next command: the same one, run again
            if p := self.verify_problem(zoo):
                problems.append(p)
            r = self.cli(*rerun(zoo))
            if r.returncode:
                problems.append(f"rerun '{' '.join(rerun(zoo)[:1])}' exit {r.returncode}: {r.stderr.strip()[-300:]}")
            elif not change(pre_reg, registry(zoo)):
                problems.append("rerun succeeded but the registry does not hold its change")
        else:   # the next command: predict one image (read-only, so beside verify)
            with ThreadPoolExecutor(2) as pool:
                checks = [pool.submit(self.verify_problem, zoo), pool.submit(self.predict_problem, zoo)]
                problems += [p for f in checks if (p := f.result())]
        return problems, state

    def unnamed(self, zoo: Path) -> list[str]:
        """Files the registry does not name (a crash's litter is harmless; reported as information)."""
        reg = registry(zoo)
        named = set(reg["router"]["files"]) | {f"experts/{e}/{f}" for e, r in reg["experts"].items() for f in r["files"]}
        return sorted(str(p.relative_to(zoo)) for p in zoo.rglob("*")
                      if p.is_file() and p.name not in (".lock", "registry.json") and str(p.relative_to(zoo)) not in named
                      and not p.name.endswith(".md") and p.parts[len(zoo.parts)] != "router")  # router: keeps v-1

    # ----- 2. races ----------------------------------------------------------------------------
    def race_distinct(self, trials: int) -> dict:
        res: dict = {"trials": 0, "consistent": 0, "failures": []}
        for t in range(1, trials + 1):
            zoo = self.fresh()
            pre_files = {e: tree(zoo / "experts" / e) for e in BASE}
            t0 = time.perf_counter()
            procs = {n: self.popen(*self.add_args(zoo, n, d)) for n, d in RACERS.items()}
            outs = {n: (p.communicate(), p.returncode) for n, p in procs.items()}
            problems = [f"{n} exit {rc}: {err.strip()[-300:]}" for n, ((_, err), rc) in outs.items() if rc]
            reg = registry(zoo)
            missing = [n for n in [*BASE, *RACERS] if n not in reg["experts"]]
            problems += [f"registry lacks {missing}"] if missing else []
            problems += [f"old expert {e} changed: {d}" for e, f in pre_files.items() if (d := diff(f, tree(zoo / "experts" / e)))]
            problems += [p] if (p := self.verify_problem(zoo)) else []
            r = self.cli("router", "--zoo", str(zoo), "--json")
            listed = json.loads(r.stdout).get("experts", []) if r.returncode == 0 else []
            if r.returncode or set(listed) != set(BASE) | set(RACERS):
                problems.append(f"router lists {listed} (exit {r.returncode}): {r.stderr.strip()[-200:]}")
            problems += [p] if (p := self.predict_problem(zoo)) else []
            self.record(res, t, problems, f"[race 4 names] trial {t}: {time.perf_counter() - t0:.0f}s")
        return res

    def race_same(self, trials: int) -> dict:
        res: dict = {"trials": 0, "consistent": 0, "failures": []}
        datas = ["builtin:digits", "builtin:textures"]
        for t in range(1, trials + 1):
            zoo = self.fresh()
            pre_files = {e: tree(zoo / "experts" / e) for e in BASE}
            procs = [self.popen(*self.add_args(zoo, "twin", d)) for d in datas]
            outs = [(p.communicate(), p.returncode) for p in procs]
            ok = [i for i, (_, rc) in enumerate(outs) if rc == 0]
            problems: list[str] = []
            if len(ok) != 1:
                problems.append(f"{len(ok)} of 2 landed (exits {[rc for _, rc in outs]})")
            else:
                loser = outs[1 - ok[0]]
                problems += [p] if (p := one_line_error(loser[0][1])) else []
                got = registry(zoo)["experts"].get("twin", {}).get("training", {}).get("data")
                if got != datas[ok[0]]:
                    problems.append(f"the winner used {datas[ok[0]]} but the registry records {got}")
            problems += [f"old expert {e} changed: {d}" for e, f in pre_files.items() if (d := diff(f, tree(zoo / "experts" / e)))]
            problems += [p] if (p := self.verify_problem(zoo)) else []
            self.record(res, t, problems, f"[race same name] trial {t}")
        return res

    def record(self, res: dict, trial: int, problems: list[str], label: str) -> None:
        res["trials"] += 1
        if problems:
            res["failures"].append({"trial": trial, "problems": problems})
        else:
            res["consistent"] += 1
        self.log(f"{label}: " + ("consistent" if not problems else "INCONSISTENT: " + "; ".join(problems)))

    # ----- 3. full disk ---------------------------------------------------------------------------
    def full_disk(self) -> dict:
        mnt = self.out / "tmpfs"
        mnt.mkdir(exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mnt)], capture_output=True, text=True)
        if r.returncode:
            reason = (r.stderr.strip() or f"mount exit {r.returncode}").splitlines()[-1]
            self.log(f"[full disk] skipped: {reason}")
            return {"skipped": reason, "trials": 0, "consistent": 0, "failures": []}
        res: dict = {"trials": 0, "consistent": 0, "failures": [], "outcomes": []}
        try:
            for t, kb in enumerate(DISK_MARGINS_KB, 1):
                problems, outcome = self.disk_trial(mnt, kb)
                res["outcomes"].append({"free_kb": kb, "outcome": outcome})
                self.record(res, t, problems, f"[full disk] {kb} KiB free: {outcome}")
                if problems:
                    res["failures"][-1]["free_kb"] = kb
        finally:
            subprocess.run(["umount", str(mnt)], capture_output=True)
        return res

    def disk_trial(self, mnt: Path, free_kb: int) -> tuple[list[str], str]:
        """A zoo on the tmpfs with ``free_kb`` KiB left: add-task must fail cleanly or land whole."""
        for p in mnt.iterdir():
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        zoo = self.fresh(mnt / "zoo")
        st = os.statvfs(mnt)
        filler = max(0, st.f_bavail * st.f_frsize - free_kb * 1024)
        with open(mnt / "filler", "wb") as f:
            f.write(b"\0" * filler)
        before = tree(zoo)
        r = self.cli(*self.add_args(zoo))
        problems: list[str] = []
        if r.returncode == 0:
            outcome = "add-task succeeded (enough space)"
            problems += [] if NEW in registry(zoo)["experts"] else ["add-task exit 0 but the task is not registered"]
        else:
            outcome = f"add-task failed: {(r.stderr.strip().splitlines() or [''])[-1][-160:]}"
            problems += [p] if (p := one_line_error(r.stderr)) else []
            problems += [f"zoo changed: {', '.join(d)}"] if (d := diff(before, tree(zoo))) else []
            leftovers = [p.name for p in zoo.iterdir() if p.name.startswith(".staging")]
            problems += [f"staging left: {leftovers}"] if leftovers else []
        problems += [p] if (p := self.verify_problem(zoo)) else []
        if r.returncode:   # the next command: the same add-task once space is back
            (mnt / "filler").unlink()
            r2 = self.cli(*self.add_args(zoo))
            problems += [f"add-task after freeing space exit {r2.returncode}: {r2.stderr.strip()[-300:]}"] if r2.returncode else []
        return problems, outcome


def table(report: dict) -> str:
    """The markdown summary of a report."""
    rows = ["| scenario | trials | consistent | notes |", "|---|---:|---:|---|"]
    for name, s in report["scenarios"].items():
        if "skipped" in s:
            rows.append(f"| {name} | - | - | skipped: {s['skipped']} |")
            continue
        note = (f"{s['landed']} landed, {s['not_landed']} not, {s['finished_before_kill']} finished before the kill; "
                f"undisturbed {s['undisturbed_s']}s; litter after {s['litter']}" if "landed" in s else
                "; ".join(f"{o['free_kb']} KiB free: {o['outcome'].split(':')[0]}" for o in s.get("outcomes", [])))
        rows.append(f"| {name} | {s['trials']} | {s['consistent']} | {note} |")
    lines = [f"- {n}: {s['trials']} {'kills' if 'landed' in s else 'trials'}, {s['consistent']} consistent"
             for n, s in report["scenarios"].items() if "skipped" not in s]
    head = (f"# clipzoo stress ({report['machine']['cpus']} CPUs, {report['machine']['platform']}; "
            f"{report['run_seconds']:.0f} s)\n\n")
    return head + "\n".join(lines) + "\n\n" + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="Output folder (outside the repository).")
    ap.add_argument("--kills", type=int, default=20, help="SIGKILLs per command (default 20).")
    ap.add_argument("--races", type=int, default=1, help="Trials of each race (default 1).")
    ap.add_argument("--json", action="store_true", help="Print the JSON report instead of progress lines.")
    args = ap.parse_args(argv)
    out = args.out.resolve()
    s = Stress(out, args.json)
    t0 = time.perf_counter()
    s.setup()
    removed = lambda pre, post: (set(post["experts"]) == set(pre["experts"]) - {VICTIM}   # noqa: E731
                                 and post["router"]["version"] == pre["router"]["version"] + 1)
    add_done = lambda pre, post: (set(post["experts"]) == set(pre["experts"]) | {NEW}   # noqa: E731
                                  and all(post["experts"][e] == r for e, r in pre["experts"].items())
                                  and post["router"]["version"] == pre["router"]["version"] + 1)
    rebuilt = lambda pre, post: (post["experts"] == pre["experts"]   # noqa: E731
                                 and post["router"]["version"] == pre["router"]["version"] + 1
                                 and post["router"]["files"] != pre["router"]["files"])
    remove = lambda z: ["remove", "--zoo", str(z), "--name", VICTIM]   # noqa: E731
    plan: dict[str, Callable[[], dict]] = {
        "race: 4 add-task, distinct names": lambda: s.race_distinct(args.races),
        "race: 2 add-task, same name": lambda: s.race_same(args.races),
        "full disk (3 MiB tmpfs)": s.full_disk,
        "add-task kill": lambda: s.kills("add-task", s.add_args, add_done, s.add_args, args.kills),
        "remove kill": lambda: s.kills("remove", remove, removed, remove, args.kills),
        "router --rebuild kill": lambda: s.kills("router", lambda z: ["router", "--zoo", str(z), "--rebuild"],
                                                 rebuilt, None, args.kills),
    }
    scen: dict[str, dict] = {}
    report: dict = {}
    for name, run in plan.items():   # the report is rewritten after each scenario
        scen[name] = run()
        report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                              "python": platform.python_version(), "load_avg": os.getloadavg()},
                  "settings": {"kills": args.kills, "races": args.races, "epochs": int(EPOCHS), "template": list(BASE),
                               "kill_fractions": f"i/{args.kills + 1}, i=1..{args.kills}",
                               "disk_margins_kb": DISK_MARGINS_KB},
                  "scenarios": scen, "run_seconds": round(time.perf_counter() - t0, 1)}
        (out / "stress.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "stress.md").write_text(table(report))
    print(json.dumps(report, indent=2) if args.json else table(report))
    shutil.rmtree(s.work, ignore_errors=True)
    return 1 if any(sc["consistent"] != sc["trials"] for sc in scen.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
