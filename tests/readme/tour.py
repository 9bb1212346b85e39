#!/usr/bin/env python3
"""The README, tested as written.

Copies the repository's files (tracked and new, as they are in the working tree, with their
modification times) into a fresh directory, runs `./scripts/dev` there exactly as README.md
says, waits for the cluster to be ready, then runs every command of the README's
"A 60-second tour" section, taken from README.md itself so the two cannot drift apart. Each
command's exit status is checked, and a few outputs. Then:

- Ctrl-C (SIGINT to the foreground process group) stops the cluster: exit status 0, no node
  process left, every port free again;
- `./scripts/dev` started again in the same directory serves the same data;
- a second `./scripts/dev` while one runs fails at once, naming the busy port.

The tour talks to the dev cluster's default ports (127.0.0.1:7701-7703, 7801-7803 and
8701-8703), as the README does: they must be free, or the test stops before starting anything.

Ends with the plain `N passed, N failed` line.
"""

import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GRPC_PORTS = [7701, 7702, 7703]
PEER_PORTS = [7801, 7802, 7803]
HTTP_PORTS = [8701, 8702, 8703]
# The first `./scripts/dev` in the copy compiles the workspace's own crates (the shared target
# dir keeps the dependencies, RocksDB among them).
BUILD_AND_READY_LIMIT = 40 * 60
READY_LIMIT = 120
COMMAND_LIMIT = 300
STOP_LIMIT = 30

passed = 0
failed = 0


def log(text):
    print(text, flush=True)


def check(ok, what, detail=""):
    global passed, failed
    if ok:
        passed += 1
        log(f"ok   {what}")
    else:
        failed += 1
        log(f"FAIL {what}" + (f"\n     {detail}" if detail else ""))
    return ok


class Fatal(Exception):
    """A failure after which the rest of the tour cannot run."""


def require(ok, what, detail=""):
    if not check(ok, what, detail):
        raise Fatal(what)


def tour_commands(readme):
    """The commands of the first ```sh block under '## A 60-second tour'.

    A line ending in a backslash, or a line starting with a pipe, continues the command
    before it."""
    text = readme.read_text()
    at = text.find("## A 60-second tour")
    if at < 0:
        raise Fatal("README.md has no '## A 60-second tour' section")
    section = text[at:]
    nxt = section.find("\n## ", 3)
    if nxt >= 0:
        section = section[:nxt]
    m = re.search(r"```sh\n(.*?)```", section, re.S)
    if not m:
        raise Fatal("the tour section has no ```sh block")
    commands = []
    continued = False
    for raw in m.group(1).splitlines():
        line = raw.rstrip()
        if not line.strip():
            continued = False
            continue
        if commands and (continued or line.lstrip().startswith("|")):
            commands[-1] += "\n" + line
        else:
            commands.append(line)
        continued = line.endswith("\\")
    return commands


def port_free(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As the nodes bind: connections of a stopped cluster left in TIME_WAIT do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def copy_repository(dest):
    """Copies the working tree's tracked and untracked-but-not-ignored files."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.split(b"\0")
    count = 0
    for name in listed:
        if not name:
            continue
        rel = Path(os.fsdecode(name))
        src = ROOT / rel
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the working tree
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)
        count += 1
    return count


def processes_mentioning(needle):
    """PIDs whose command line contains `needle`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(entry.name))
    return found


class Dev:
    """`./scripts/dev` in its own process group, as a terminal runs it."""

    def __init__(self, cwd, name):
        self.cwd = cwd
        self.out_path = cwd.parent / f"{name}.out"
        self.out = open(self.out_path, "w")
        self.proc = subprocess.Popen(
            ["./scripts/dev"], cwd=cwd, stdout=self.out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )

    def output(self):
        return self.out_path.read_text(errors="replace")

    def wait_ready(self, limit):
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if "junction dev cluster ready" in self.output():
                return True
            if self.proc.poll() is not None:
                return False
            time.sleep(0.5)
        return False

    def ctrl_c(self):
        os.killpg(self.proc.pid, signal.SIGINT)
        try:
            return self.proc.wait(STOP_LIMIT)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self.out.close()


def run(cmd, cwd, limit=COMMAND_LIMIT):
    """Runs a command as typed into a terminal: read by bash from its input, not given as
    `bash -c CMD`, whose command line would contain the text that `pgrep -f` looks for."""
    return subprocess.run(
        ["bash"], cwd=cwd, capture_output=True, text=True, timeout=limit, input=cmd + "\n",
    )


def station_offsets(cwd, name):
    r = run(f"./scripts/junction station describe {name} --json", cwd)
    if r.returncode != 0:
        return None, r.stderr
    info = json.loads(r.stdout)
    return sum(p["next_offset"] for p in info["partition_info"]), info


def follow_check(cmd, cwd):
    """A `read --follow` runs until Ctrl-C: it must print a message produced after it started,
    then exit 0 on SIGINT."""
    out_path = cwd.parent / "follow.out"
    with open(out_path, "w") as out:
        proc = subprocess.Popen(
            ["bash", "-c", cmd], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # `-c` here: the command waits for Ctrl-C, so bash must not also wait for input
        try:
            deadline = time.monotonic() + 60
            seen = False
            round_ = 0
            while time.monotonic() < deadline and proc.poll() is None:
                # Keyed messages under many keys: some land in every partition.
                lines = "".join(f"follow-{round_}-{k}\tfollow-check\n" for k in range(24))
                subprocess.run(
                    ["./scripts/junction", "produce", "demo", "--key-sep", "TAB"],
                    cwd=cwd, input=lines, text=True, capture_output=True, timeout=COMMAND_LIMIT,
                )
                round_ += 1
                t = time.monotonic() + 2
                while time.monotonic() < t:
                    if "follow-check" in out_path.read_text(errors="replace"):
                        seen = True
                        break
                    time.sleep(0.1)
                if seen:
                    break
            check(seen, f"`{cmd}` prints messages produced after it started",
                  out_path.read_text(errors="replace")[-2000:])
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
            try:
                code = proc.wait(STOP_LIMIT)
            except subprocess.TimeoutExpired:
                code = None
            check(code == 0, f"`{cmd}` exits 0 on Ctrl-C", f"exit status {code}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def kill_check(cmd, cwd, data_dir):
    """`kill -9 $(pgrep -f 'junction serve --id 1')`: first make sure the pattern matches only
    this tour's node 1, so that the line cannot hit anything else on the machine."""
    pattern = re.search(r"pgrep -f '([^']+)'", cmd)
    require(pattern is not None, "the kill line names a pgrep pattern", cmd)
    matches = run(f"pgrep -f '{pattern.group(1)}'", cwd).stdout.split()
    ours = processes_mentioning(str(data_dir / "node1"))
    require(len(matches) == 1 and int(matches[0]) in ours,
            "the kill line's pgrep matches exactly this cluster's node 1",
            f"pgrep: {matches}, node 1 of this tour: {ours}")
    victim = int(matches[0])
    r = run(cmd, cwd)
    check(r.returncode == 0, f"`{cmd}` exits 0", r.stderr)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and Path(f"/proc/{victim}").exists():
        # A killed child stays a zombie until `junction dev` reaps it.
        try:
            state = Path(f"/proc/{victim}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    alive = Path(f"/proc/{victim}/stat").exists() and \
        Path(f"/proc/{victim}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    check(not alive, "node 1 is gone after the kill line")


def tour(copy):
    data = copy / "data"
    commands = tour_commands(copy / "README.md")
    require(len(commands) >= 10, "the README's tour has its commands", repr(commands))
    log(f"--- the tour has {len(commands)} commands")
    produced = 0
    for cmd in commands:
        if "--follow" in cmd:
            follow_check(cmd, copy)
            continue
        if cmd.startswith("kill -9"):
            kill_check(cmd, copy, data)
            continue
        r = run(cmd, copy)
        check(r.returncode == 0, f"`{cmd}` exits 0",
              f"exit {r.returncode}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-2000:]}")
        if r.returncode != 0:
            continue
        if "station describe demo" in cmd:
            rows = [l.split() for l in r.stdout.splitlines()]
            check((["station", "default/demo"] in rows or ["station", "demo"] in rows) and ["partitions", "3"] in rows
                  and all(any(row[:1] == [str(p)] for row in rows) for p in range(3)),
                  "describe shows the station and a row for each of its 3 partitions", r.stdout)
        elif "produce demo --key-sep TAB" in cmd:
            produced += 3
        elif "seq 1 10000" in cmd:
            produced += 10000
        elif "--count 5" in cmd:
            lines = r.stdout.strip().splitlines()
            check(len(lines) == 5, "read --count 5 prints 5 messages", r.stdout)
        elif "--json" in cmd and "read demo" in cmd:
            lines = r.stdout.strip().splitlines()
            ok = bool(lines)
            for line in lines:
                try:
                    obj = json.loads(line)
                    ok = ok and obj.get("partition") == 0 and "payload" in obj
                except ValueError:
                    ok = False
            check(ok, "read --partition 0 --json prints JSON objects of partition 0",
                  r.stdout[:2000])
        elif cmd.startswith("curl") and "-X POST" in cmd:
            try:
                positions = json.loads(r.stdout)["positions"]
                ok = len(positions) == 1 and positions[0]["duplicate"] is False
            except (ValueError, KeyError, TypeError):
                ok = False
            check(ok, "REST produce answers the message's position", r.stdout[:2000])
            produced += 1
        elif cmd.startswith("curl") and "/messages?max=2" in cmd:
            try:
                ok = len(json.loads(r.stdout)["messages"]) == 2
            except (ValueError, KeyError, TypeError):
                ok = False
            check(ok, "REST read returns two messages", r.stdout[:2000])
        elif "cluster status" in cmd:
            check(all(f"127.0.0.1:{p}" in r.stdout for p in GRPC_PORTS),
                  "cluster status lists the three nodes", r.stdout)
        elif "--count 3" in cmd:
            lines = r.stdout.strip().splitlines()
            check(len(lines) == 3, "read --count 3 is served with node 1 killed", r.stdout)
    total, info = station_offsets(copy, "demo")
    check(total is not None and total >= produced + 24,
          f"station demo holds every produced message ({produced} + the follow checks)",
          f"{total}: {info}")
    return total


def ports_free_after_stop():
    deadline = time.monotonic() + STOP_LIMIT
    busy = []
    while time.monotonic() < deadline:
        busy = [p for p in GRPC_PORTS + PEER_PORTS + HTTP_PORTS if not port_free(p)]
        if not busy:
            return []
        time.sleep(0.2)
    return busy


def stop_and_check(dev, data, label):
    code = dev.ctrl_c()
    check(code == 0, f"{label}: Ctrl-C stops ./scripts/dev with exit status 0",
          f"exit status {code}\n{dev.output()[-2000:]}")
    left = processes_mentioning(str(data))
    check(not left, f"{label}: no node process is left", f"pids {left}")
    busy = ports_free_after_stop()
    check(not busy, f"{label}: every port is free again", f"busy: {busy}")


def main():
    for p in GRPC_PORTS + PEER_PORTS + HTTP_PORTS:
        if not port_free(p):
            log(f"FAIL port 127.0.0.1:{p} is in use: the README tour needs the dev cluster's "
                "default ports (is a `junction dev` running?)")
            log("0 passed, 1 failed")
            return 1
    target = Path(os.environ.get("CARGO_TARGET_DIR", Path.home() / ".cache/junction-target"))
    # A fixed place (under the shared target dir), so that a later run compiles only what
    # changed; a lock keeps two runs apart.
    base = target / "readme-tour"
    base.mkdir(parents=True, exist_ok=True)
    lock = open(base / "lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    copy = base / "junction"
    if copy.exists():
        shutil.rmtree(copy)
    copy.mkdir()
    n = copy_repository(copy)
    log(f"--- copied {n} files of the repository to {copy}")
    data = copy / "data"
    devs = []
    try:
        log("--- ./scripts/dev (builds the binary first)")
        dev = Dev(copy, "dev1")
        devs.append(dev)
        started = time.monotonic()
        require(dev.wait_ready(BUILD_AND_READY_LIMIT), "./scripts/dev starts a ready cluster",
                dev.output()[-4000:])
        log(f"     ready after {time.monotonic() - started:.0f} s")
        out = dev.output()
        check(f"data under {data.resolve()}" in out, "./scripts/dev keeps its data under ./data",
              out[-2000:])
        check(all((data / f"node{i}").is_dir() for i in (1, 2, 3)),
              "every node has its directory under ./data")
        check("./scripts/junction station create demo" in out,
              "./scripts/dev suggests commands a newcomer can run as printed", out[-2000:])
        check((data / "cluster-secret").is_file()
              and (data / "cluster-secret").stat().st_mode & 0o777 == 0o600,
              "the dev cluster's node-to-node secret is ./data/cluster-secret, private")
        check("node-to-node traffic: mutual TLS" in out and (data / "tls" / "ca.pem").is_file()
              and (data / "tls" / "node.key").stat().st_mode & 0o777 == 0o600,
              "the dev cluster's nodes speak mutual TLS with a throwaway CA under ./data/tls (private key 0600)",
              out[-2000:])
        total = tour(copy)
        stop_and_check(dev, data, "first run")

        log("--- ./scripts/dev again in the same directory")
        dev = Dev(copy, "dev2")
        devs.append(dev)
        require(dev.wait_ready(READY_LIMIT), "./scripts/dev starts again", dev.output()[-4000:])
        deadline = time.monotonic() + 30
        again, info = None, None
        while time.monotonic() < deadline:
            again, info = station_offsets(copy, "demo")
            if again == total:
                break
            time.sleep(0.5)
        check(again == total, "the restarted cluster serves the same data",
              f"before {total}, after {again}: {info}")

        second = subprocess.run(["./scripts/dev"], cwd=copy, capture_output=True, text=True,
                                timeout=COMMAND_LIMIT, stdin=subprocess.DEVNULL)
        check(second.returncode != 0 and "port 127.0.0.1:7701 (node 1) is in use" in second.stderr,
              "a second ./scripts/dev fails at once, naming the busy port",
              f"exit {second.returncode}\n{second.stderr[-2000:]}")
        check(dev.proc.poll() is None, "the running cluster is unaffected by the second one")
        stop_and_check(dev, data, "second run")
    except Fatal:
        pass
    except subprocess.TimeoutExpired as e:
        check(False, f"`{e.cmd}` finished within {e.timeout} s")
    finally:
        for d in devs:
            d.kill()
        for pid in processes_mentioning(str(data)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(data, ignore_errors=True)
    log(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
