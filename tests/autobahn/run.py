#!/usr/bin/env python3
"""Autobahn TestSuite (fuzzingclient cases) against a Node `ws` echo server, directly and through wsgate.

Starts `node echo_server.js` (permessage-deflate on) and `wsgate proxy --mode frames` in front of it, both on
free loopback ports, runs the `kosoku` runner over the same case selection twice -- once straight against the
echo server, once through wsgate -- and compares the two `index.json` reports. A case counts against wsgate only
when it passes directly: the exit status is 1 when any case passes directly but not through wsgate, 2 when the
run itself could not be made (a missing tool, a process that did not start, a time limit), 0 otherwise.

    python3 tests/autobahn/run.py                        # the reduced selection (a few minutes)
    python3 tests/autobahn/run.py --full                 # every case kosoku has (about 7 min per pass)
    python3 tests/autobahn/run.py --case '5.*' --case 6.4.1 --wsgate target/debug/wsgate
    python3 tests/autobahn/run.py --wsgate-arg=--validate-utf8 --outdir /tmp/autobahn

Needs: `kosoku` (PyPI) for python3, Node.js and `npm install --prefix tests/autobahn` (scripts/test installs both).
Every process started here runs in its own process group and is killed at the end, on error and on SIGTERM;
each waits below a time limit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

# The reduced selection (317 cases, 15 s a pass here with a debug build): framing, pings, reserved bits and opcodes,
# fragmentation, UTF-8, close handling, limits/performance, and the small permessage-deflate cases of 12.x/13.x
# (RSV1 and compressed payloads pass through wsgate; the larger ones take 10-45 s each, kosoku's own compression
# being slow). 9.3.1 and 9.4.1 fail even directly with kosoku ("did not receive message within 100 seconds").
# `--full` runs all 517 cases (about 7.5 min a pass; 12.x and 13.x take nearly all of it).
REDUCED_CASES = [
    "1.*",
    "2.*",
    "3.*",
    "4.*",
    "5.*",
    "6.*",
    "7.*",
    "9.*",
    "10.*",
    *(f"12.1.{n}" for n in range(1, 7)),
    "12.4.5",
    "12.4.6",
    *(f"13.1.{n}" for n in range(1, 5)),
    *(f"13.3.{n}" for n in range(1, 5)),
    *(f"13.4.{n}" for n in range(2, 4)),
]
REDUCED_EXCLUDES = ["9.3.1", "9.4.1"]

# kosoku verdicts (Autobahn's labels).
OK, NON_STRICT, INFORMATIONAL, UNIMPLEMENTED = "OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED"
CLOSE_ACCEPTABLE = {"OK", "INFORMATIONAL"}
OUTCOMES = ["passed", "non-strict", "informational", "unimplemented", "failed"]

START_WAIT = 30.0  # seconds for the echo server and wsgate to listen
STOP_WAIT = 5.0  # seconds between SIGTERM and SIGKILL


class RunError(Exception):
    """The run could not be made (not a verdict on wsgate)."""


class Terminated(BaseException):
    """SIGTERM/SIGHUP: unwinds like KeyboardInterrupt so the processes are cleaned up."""


def on_signal(signum: int, _frame: object) -> None:
    raise Terminated(signal.Signals(signum).name)


def die_with_parent() -> None:
    """In the child before exec: get SIGKILL when run.py dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    except Exception:
        pass


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after STOP_WAIT; waits for the process."""
        if self.popen.poll() is None:
            signal_group(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout=STOP_WAIT)
            except subprocess.TimeoutExpired:
                pass
        # The leader may be gone while others of its group are not: SIGKILL the group either way.
        signal_group(self.popen.pid, signal.SIGKILL)
        try:
            self.popen.wait(timeout=STOP_WAIT)
        except subprocess.TimeoutExpired:
            print(f"run.py: {self.name} (pid {self.popen.pid}) did not die", file=sys.stderr)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Procs:
    """The processes of one run; `close` stops them all, newest first."""

    def __init__(self) -> None:
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], log: Path, cwd: Path | None = None) -> Proc:
        with open(log, "wb") as out:
            try:
                popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=cwd,
                    start_new_session=True,  # its own process group, killed whole at the end
                    preexec_fn=die_with_parent,
                )
            except OSError as e:
                raise RunError(f"cannot start {name} ({argv[0]}): {e}") from e
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        while self.procs:
            self.procs.pop().stop()


def wait_for_line(proc: Proc, parse, what: str, timeout: float = START_WAIT):
    """Polls the process's log until `parse(line)` returns something; fails when it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            for line in proc.log.read_text(errors="replace").splitlines():
                found = parse(line)
                if found is not None:
                    return found
        except OSError:
            pass
        if not proc.alive():
            raise RunError(f"{proc.name} exited with {proc.popen.returncode} before {what}:\n{proc.log_tail()}")
        if time.monotonic() > deadline:
            raise RunError(f"{proc.name} did not report {what} within {timeout:.0f} s:\n{proc.log_tail()}")
        time.sleep(0.05)


def start_echo_server(procs: Procs, workdir: Path) -> tuple[Proc, int]:
    node = shutil.which("node")
    if node is None:
        raise RunError("node is not installed (Node.js runs the echo server); run scripts/test")
    if not (HERE / "node_modules" / "ws" / "package.json").is_file():
        raise RunError(
            f"{HERE / 'node_modules' / 'ws'} is missing; run scripts/test "
            "(it runs `npm install --prefix tests/autobahn --no-audit --no-fund`)"
        )
    proc = procs.start("echo server", [node, str(HERE / "echo_server.js"), "0"], workdir / "echo_server.log", HERE)

    def parse(line: str) -> int | None:
        parts = line.split()
        if len(parts) == 2 and parts[0] == "listening" and parts[1].isdigit():
            return int(parts[1])
        return None

    return proc, wait_for_line(proc, parse, "listening")


def start_wsgate(procs: Procs, workdir: Path, binary: Path, backend_port: int, extra: list[str]) -> tuple[Proc, int]:
    argv = [
        str(binary),
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--to",
        f"127.0.0.1:{backend_port}",
        "--mode",
        "frames",
        "--log-format",
        "json",
        *extra,
    ]
    proc = procs.start("wsgate", argv, workdir / "wsgate.log")

    def parse(line: str) -> int | None:
        try:
            record = json.loads(line)
        except ValueError:
            return None
        if isinstance(record, dict) and record.get("message") == "listening" and "address" in record:
            return int(str(record["address"]).rsplit(":", 1)[1])
        return None

    return proc, wait_for_line(proc, parse, "listening")


def kosoku_argv() -> list[str]:
    """The kosoku CLI: its console script, or the same entry point through this python3 (pip --user installs
    the script into ~/.local/bin, which need not be on PATH)."""
    script = shutil.which("kosoku")
    if script is not None:
        return [script]
    check = subprocess.run(
        [sys.executable, "-c", "import kosoku._cli"], capture_output=True, text=True, timeout=60
    )
    if check.returncode != 0:
        raise RunError(
            "kosoku is not installed for python3 (`pip install kosoku`); run scripts/test, which installs it\n"
            + check.stderr.strip()
        )
    return [sys.executable, "-c", "import sys; from kosoku._cli import main; sys.argv[0] = 'kosoku'; main()"]


@dataclass
class Report:
    label: str
    seconds: float
    cases: dict[str, dict] = field(default_factory=dict)  # case id -> index entry
    outdir: Path = Path()

    def detail(self, case_id: str) -> dict:
        entry = self.cases.get(case_id)
        if entry is None:
            return {}
        try:
            return json.loads((self.outdir / entry["reportfile"]).read_text())
        except (OSError, ValueError, KeyError):
            return {}


def run_kosoku(
    procs: Procs, label: str, port: int, includes: list[str], excludes: list[str], args, workdir: Path
) -> Report:
    outdir = workdir / f"reports-{label}"
    argv = kosoku_argv() + ["-p", str(args.parallelism), "-o", str(outdir)]
    for case in includes:
        argv += ["-i", case]
    for case in excludes:
        argv += ["-x", case]
    argv.append(f"127.0.0.1:{port}")
    print(f"run.py: {label}: kosoku on 127.0.0.1:{port} ...", flush=True)
    started = time.monotonic()
    proc = procs.start(f"kosoku ({label})", argv, workdir / f"kosoku-{label}.log")
    try:
        proc.popen.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        raise RunError(f"kosoku ({label}) did not finish within {args.timeout:.0f} s:\n{proc.log_tail()}") from None
    finally:
        procs.procs.remove(proc)
        proc.stop()
    seconds = time.monotonic() - started
    index = outdir / "index.json"
    # kosoku exits 1 when any case failed; that is a verdict to compare, not an error. No index is one.
    if not index.is_file():
        raise RunError(f"kosoku ({label}) exited {proc.popen.returncode} without writing {index}:\n{proc.log_tail()}")
    try:
        agents = json.loads(index.read_text())
    except ValueError as e:
        raise RunError(f"kosoku ({label}) wrote an unreadable {index}: {e}") from e
    # {agent (the Server header, else HOST:PORT): {case id: {behavior, behaviorClose, remoteCloseCode, duration,
    # reportfile}}}
    report = Report(label, seconds, outdir=outdir)
    for cases in agents.values():
        report.cases.update(cases)
    if not report.cases:
        raise RunError(f"kosoku ({label}) ran no case: does the selection match any? {includes} minus {excludes}")
    print(f"run.py: {label}: {len(report.cases)} cases in {seconds:.1f} s", flush=True)
    return report


def outcome(entry: dict | None) -> str:
    """One word per case, as Autobahn's report colours it: a bad close fails a case whatever its behavior."""
    if entry is None:
        return "missing"
    behavior, close = entry.get("behavior"), entry.get("behaviorClose")
    if behavior == UNIMPLEMENTED:
        return "unimplemented"
    if close not in CLOSE_ACCEPTABLE:
        return "failed"
    return {OK: "passed", NON_STRICT: "non-strict", INFORMATIONAL: "informational"}.get(behavior, "failed")


def passes(entry: dict | None) -> bool:
    return outcome(entry) in ("passed", "non-strict", "informational")


def case_key(case_id: str) -> list[int]:
    return [int(p) if p.isdigit() else 0 for p in case_id.split(".")]


def verdict(entry: dict | None) -> str:
    if entry is None:
        return "not run"
    return f"{entry.get('behavior')}/{entry.get('behaviorClose')} close={entry.get('remoteCloseCode')}"


def describe(report: Report, case_id: str, indent: str = "      ") -> str:
    d = report.detail(case_id)
    if not d:
        return ""
    lines = [
        f"case: {d.get('description', '').strip()}",
        f"expected: {d.get('expectation', '').strip()}",
        f"result: {d.get('result', '')}",
        f"close: {d.get('resultClose', '')}",
    ]
    if d.get("wasNotCleanReason"):
        lines.append(f"not clean: {d['wasNotCleanReason']}")
    lines.append(
        f"remote close: {d.get('remoteCloseCode')} {d.get('remoteCloseReason') or ''}".rstrip()
        + f"; closedByMe={d.get('closedByMe')} droppedByMe={d.get('droppedByMe')}"
    )
    return "\n".join(indent + " ".join(line.split()) for line in lines)


def compare(direct: Report, proxied: Report) -> list[str]:
    """Prints the table and the differences; returns the cases that pass directly but not through wsgate."""
    ids = sorted(set(direct.cases) | set(proxied.cases), key=case_key)

    def side_by_side(case_id: str) -> str:
        return f"direct {verdict(direct.cases.get(case_id))}; wsgate {verdict(proxied.cases.get(case_id))}"
    counts = {r.label: {o: 0 for o in OUTCOMES + ["missing"]} for r in (direct, proxied)}
    for r in (direct, proxied):
        for case_id in ids:
            counts[r.label][outcome(r.cases.get(case_id))] += 1

    columns = OUTCOMES + (["missing"] if any(counts[r]["missing"] for r in counts) else [])
    header = f"{'run':<10}{'cases':>7}" + "".join(f"{c:>15}" for c in columns) + f"{'seconds':>10}"
    print()
    print(header)
    print("-" * len(header))
    for r in (direct, proxied):
        row = f"{r.label:<10}{len(r.cases):>7}" + "".join(f"{counts[r.label][c]:>15}" for c in columns)
        print(row + f"{r.seconds:>10.1f}")
    print()

    direct_failures = [c for c in ids if c in direct.cases and not passes(direct.cases[c])]
    if direct_failures:
        print(f"Not passing even directly ({len(direct_failures)}, not counted against wsgate):")
        for case_id in direct_failures:
            print(f"  {case_id:<10} {verdict(direct.cases[case_id])}")
        print()

    changed = [
        c
        for c in ids
        if passes(direct.cases.get(c))
        and passes(proxied.cases.get(c))
        and outcome(direct.cases.get(c)) != outcome(proxied.cases.get(c))
    ]
    if changed:
        print(f"Passing both ways with a different verdict ({len(changed)}):")
        for case_id in changed:
            print(f"  {case_id:<10} {side_by_side(case_id)}")
        print()

    regressions = [c for c in ids if passes(direct.cases.get(c)) and not passes(proxied.cases.get(c))]
    if regressions:
        print(f"Passing directly but not through wsgate ({len(regressions)}):")
        for case_id in regressions:
            print(f"  {case_id:<10} {side_by_side(case_id)}")
            text = describe(proxied, case_id)
            if text:
                print(text)
        print()
    else:
        print("Every case that passes directly passes through wsgate.")
    return regressions


def find_wsgate(given: str | None) -> Path:
    if given:
        path = Path(given)
        if not path.is_file():
            raise RunError(f"no wsgate binary at {path}")
        return path.resolve()
    for candidate in (REPO / "target" / "release" / "wsgate", REPO / "target" / "debug" / "wsgate"):
        if candidate.is_file():
            return candidate
    raise RunError("no wsgate binary in target/release or target/debug: run `cargo build --release` or pass --wsgate")


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Autobahn fuzzingclient cases against a Node ws echo server, directly and through wsgate "
        "(frames mode); fails when a case passes directly but not through wsgate.",
    )
    parser.add_argument("--wsgate", help="wsgate binary (default: target/release/wsgate, else target/debug/wsgate)")
    parser.add_argument(
        "--case",
        "-i",
        action="append",
        metavar="GLOB",
        help="case id or glob to run, repeatable (default: the reduced selection)",
    )
    parser.add_argument("--exclude", "-x", action="append", metavar="GLOB", help="case id or glob to leave out")
    parser.add_argument("--full", action="store_true", help="every case kosoku has (instead of the reduced selection)")
    parser.add_argument("--parallelism", "-p", type=int, default=2, help="cases run at once by kosoku (default 2)")
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds each kosoku pass may take (default 1800)"
    )
    parser.add_argument(
        "--wsgate-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `wsgate proxy`, repeatable (e.g. --wsgate-arg=--validate-utf8)",
    )
    parser.add_argument(
        "--outdir", help="keep reports and logs here (default: a temporary folder, removed unless the run fails)"
    )
    args = parser.parse_args()
    if args.full and args.case:
        parser.error("--full and --case exclude each other")

    if args.full:
        includes, excludes = [], list(args.exclude or [])
    elif args.case:
        includes, excludes = list(args.case), list(args.exclude or [])
    else:
        includes, excludes = list(REDUCED_CASES), REDUCED_EXCLUDES + list(args.exclude or [])

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    if args.outdir:
        workdir = Path(args.outdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        for old in ("reports-direct", "reports-wsgate"):
            shutil.rmtree(workdir / old, ignore_errors=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="wsgate-autobahn-"))

    procs = Procs()
    status = 2
    interrupted = False
    try:
        binary = find_wsgate(args.wsgate)
        selection = " ".join(includes) if includes else "the whole suite"
        if excludes:
            selection += " minus " + " ".join(excludes)
        print(f"run.py: cases: {selection}; wsgate: {binary}; output: {workdir}", flush=True)
        echo, echo_port = start_echo_server(procs, workdir)
        wsgate, wsgate_port = start_wsgate(procs, workdir, binary, echo_port, args.wsgate_arg)

        direct = run_kosoku(procs, "direct", echo_port, includes, excludes, args, workdir)
        if not echo.alive():
            raise RunError(f"the echo server died during the direct run:\n{echo.log_tail()}")
        proxied = run_kosoku(procs, "wsgate", wsgate_port, includes, excludes, args, workdir)

        problems = []
        if not echo.alive():
            problems.append(f"the echo server died during the wsgate run:\n{echo.log_tail()}")
        if not wsgate.alive():
            problems.append(f"wsgate exited with {wsgate.popen.returncode} during the run:\n{wsgate.log_tail()}")
        log = wsgate.log.read_text(errors="replace")
        if "panicked" in log:
            lines = [line for line in log.splitlines() if "panicked" in line]
            problems.append("wsgate panicked:\n" + "\n".join(lines[:10]))

        regressions = compare(direct, proxied)
        for problem in problems:
            print(f"run.py: {problem}")
        status = 1 if regressions or problems else 0
        if status and workdir.is_dir():
            print(f"run.py: reports and logs kept in {workdir}")
    except RunError as e:
        print(f"run.py: error: {e}", file=sys.stderr)
        print(f"run.py: logs in {workdir}", file=sys.stderr)
        status = 2
    except (KeyboardInterrupt, Terminated) as e:
        print(f"run.py: interrupted ({e or 'SIGINT'}); stopping", file=sys.stderr)
        status = 2
        interrupted = True
    finally:
        procs.close()
        if not args.outdir and (status == 0 or interrupted):
            shutil.rmtree(workdir, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
