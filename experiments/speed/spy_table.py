"""Where a launching thread's time goes, from py-spy's raw stacks (`py-spy record --native --idle --threads --format
raw`, one file per process, named spy-PID.txt): the prepared GPU run (experiments/gpu_run.sh) records the ladder's
gang processes for a few seconds once they train, and this turns the stacks into two Markdown tables for run.log.

    python experiments/speed/spy_table.py [--seconds S] [--label NAME] spy-123.txt spy-456.txt ...

Per process, its main thread's samples by where they were (first match wins):
    graph launch       inside torch.cuda.CUDAGraph.replay (the driver's launch, and its wait for room in a
                       stream's full queue)
    other CUDA calls   any other frame in torch's CUDA code, the CUDA runtime or driver (a copy, a fill, an
                       event query, a sync)
    waiting            below the innermost Python frame, a native frame that waits: for the GIL, a lock, a
                       condition, a sleep, a poll
    CPU work           the rest: the interpreter and torch's host code
and how many cores its other threads kept busy (their samples not waiting, over the main thread's). The pace
lines say how fast a gang went; this says whether its thread spent that time launching (a costly launch, or a
GPU that does not keep up), on the CPU (Python: more threads, i.e. processes, help), or waiting (for the GIL: a
background thread of its own holds it). The second table lists the main threads' most frequent stacks, by their
innermost Python frame and their leaf.
"""
from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

CATEGORIES = ("graph launch", "other CUDA calls", "waiting", "CPU work")
# a Python frame: `name (path.py:line)` or `name (<frozen module>:line)`; a native one: `name (library)`, or
# `name (source.c:line)` where the library has line tables
PY_FRAME = re.compile(r"^(?P<name>.*) \((?P<path>[^()]*\.py|<[^()]*>):(?P<line>\d+)\)$")
GRAPH_REPLAY = re.compile(r"^(CUDAGraph\.)?replay \([^()]*cuda/graphs\.py:\d+\)$")  # py-spy 0.4 names the class too
CUDA_LIB = re.compile(r"\((libcuda|libcudart|libnvidia|libcublas|libcudnn|libtorch_cuda|libc10_cuda)[^()]*\)$")
WAITS = re.compile(r"take_gil|PyEval_RestoreThread|acquire_lock|pthread_cond|futex|sem_wait|sem_timedwait|"
                   r"sem_clockwait|lll_lock_wait|nanosleep|epoll_wait|poll|select|sched_yield|syscall")


def parse(path: Path) -> list[tuple[str, list[str], int]]:
    """(thread name, frames root first, samples) for each line of a raw file."""
    out = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = frames.pop(0) if frames and frames[0].startswith("thread (") else "thread (?)"
        name = thread.split(": ", 1)[1] if ": " in thread else thread
        out.append((name, frames, int(count)))
    return out


def category(frames: list[str]) -> str:
    if any(GRAPH_REPLAY.match(f) for f in frames):
        return "graph launch"
    if any(CUDA_LIB.search(f) for f in frames):
        return "other CUDA calls"
    if any(WAITS.search(f) for f in native_tail(frames)):  # below the innermost Python frame, a wait
        return "waiting"
    return "CPU work"


def native_tail(frames: list[str]) -> list[str]:
    """The native frames below the innermost Python frame (all of them, where there is none)."""
    for i in range(len(frames) - 1, -1, -1):
        if PY_FRAME.match(frames[i]):
            return frames[i + 1:]
    return frames


def short(frame: str, width: int = 60) -> str:
    """A frame as `name path-tail:line` (Python) or `name (library)` (native), its name cut to `width`."""
    m = PY_FRAME.match(frame)
    if m:
        name, place = m["name"], f" {'/'.join(Path(m['path']).parts[-2:])}:{m['line']}"
    else:
        name, _, lib = frame.rpartition(" (")
        name, place = (name, f" ({lib}") if name else (frame, "")
    return (name if len(name) <= width else name[:width - 1] + "…") + place


def where(frames: list[str]) -> str:
    """The innermost Python frame, and the leaf when it is a native one below it."""
    py = [f for f in frames if PY_FRAME.match(f)]
    inner = short(py[-1]) if py else "(no Python frame)"
    leaf = frames[-1] if frames else ""
    return inner if not leaf or (py and leaf == py[-1]) else f"{inner} ← {short(leaf)}"


def main_thread(rows: list[tuple[str, list[str], int]]) -> str | None:
    """The main thread's name: MainThread where py-spy names threads, else the thread with the most samples."""
    per: Counter[str] = Counter()
    for t, _, n in rows:
        per[t] += n
    return "MainThread" if "MainThread" in per else (per.most_common(1)[0][0] if per else None)


def tables(files: list[Path], seconds: float | None, label: str) -> str:
    head = (f"| py-spy, {label} (pid) | samples | " + " | ".join(f"main thread: {c}" for c in CATEGORIES)
            + " | other threads busy (cores) |")
    lines = [head, "|" + "---|" * (len(CATEGORIES) + 3)]
    stacks: Counter[str] = Counter()
    total = 0
    for path in files:
        rows = parse(path)
        name = main_thread(rows)
        main = [(f, n) for t, f, n in rows if t == name]
        ticks = sum(n for _, n in main)
        if not ticks:
            lines.append(f"| {path.stem} | 0 | " + " | ".join("–" for _ in CATEGORIES) + " | – |")
            continue
        by = Counter()
        for frames, n in main:
            by[category(frames)] += n
            stacks[where(frames)] += n
        total += ticks
        busy = sum(n for t, f, n in rows if t != name and category(f) != "waiting")
        lines.append(f"| {path.stem.removeprefix('spy-')} | {ticks} | "
                     + " | ".join(f"{100 * by[c] / ticks:.0f} %" for c in CATEGORIES) + f" | {busy / ticks:.2f} |")
    span = f", {seconds:g} s each" if seconds else ""
    lines += ["", f"| the main threads' commonest stacks{span}: innermost Python frame ← leaf | share |", "|---|---|"]
    lines += [f"| {s} | {100 * n / total:.1f} % |" for s, n in stacks.most_common(10)] if total else ["| none | – |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="py-spy raw files, one per process (spy-PID.txt)")
    ap.add_argument("--seconds", type=float, help="how long each was recorded (for the caption)")
    ap.add_argument("--label", default="the ladder's gang processes", help="what was recorded")
    args = ap.parse_args(argv)
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        ap.error(f"no such py-spy raw file: {', '.join(missing)}")
    print(tables(sorted(args.files), args.seconds, args.label))


if __name__ == "__main__":
    main()
