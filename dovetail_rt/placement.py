"""Where the verifier runs: NUMA node, CPU cores, thread count. Read once, at process start.

``apply`` must run before torch is imported: OpenMP reads its environment when it loads.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SYS_NODES = Path("/sys/devices/system/node")
SYS_CPUS = Path("/sys/devices/system/cpu")


def cpu_identity() -> str:
    """The CPU's architecture, model name and feature flags: what a native build, its kernels and a
    measured verification curve belong to."""
    import platform

    model, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith(("flags", "Features")) and not flags:
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return f"{platform.machine()} | {model or platform.processor()} | {flags}"


def machine_id() -> str:
    """A short digest of ``cpu_identity()``."""
    import hashlib

    return hashlib.sha256(cpu_identity().encode()).hexdigest()[:16]


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11] (the kernel's cpulist format)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-")
            cpus.extend(range(int(lo), int(hi) + 1))
        else:
            cpus.append(int(part))
    return sorted(set(cpus))


@dataclass(frozen=True)
class NumaNode:
    id: int
    cpus: tuple[int, ...]
    mem_free_kb: int = 0


def read_numa_nodes(root: Path = SYS_NODES) -> list[NumaNode]:
    """NUMA nodes from sysfs (``root`` is injectable for tests). One node 0 when sysfs has none."""
    nodes = []
    for path in sorted(Path(root).glob("node[0-9]*"), key=lambda p: int(p.name[4:])):
        cpulist = path / "cpulist"
        if not cpulist.exists():
            continue
        cpus = parse_cpulist(cpulist.read_text())
        mem_free = 0
        meminfo = path / "meminfo"
        if meminfo.exists():
            for line in meminfo.read_text().splitlines():
                if "MemFree:" in line:
                    mem_free = int(line.split()[-2])
        nodes.append(NumaNode(int(path.name[4:]), tuple(cpus), mem_free))
    if not nodes:
        nodes = [NumaNode(0, tuple(sorted(os.sched_getaffinity(0))))]
    return nodes


def physical_cores(cpus: list[int], root: Path = SYS_CPUS) -> list[int]:
    """One CPU per physical core (drops hyper-thread siblings) where sysfs tells the topology."""
    seen, firsts = set(), []
    for cpu in cpus:
        topo = Path(root) / f"cpu{cpu}" / "topology"
        try:
            key = ((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip())
        except OSError:
            key = ("cpu", str(cpu))
        if key not in seen:
            seen.add(key)
            firsts.append(cpu)
    return firsts


@dataclass(frozen=True)
class Placement:
    node: int
    cpus: tuple[int, ...]
    threads: int
    multi_node: bool = False  # the machine has several NUMA nodes (llama.cpp then follows the CPU mask)

    def describe(self) -> str:
        return f"NUMA node {self.node}, CPUs {format_cpulist(self.cpus)}, {self.threads} threads"


def format_cpulist(cpus) -> str:
    cpus, parts = sorted(cpus), []
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        parts.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(parts)


def choose(
    nodes: list[NumaNode],
    allowed: set[int],
    numa_node: int | None = None,
    cpus: list[int] | None = None,
    threads: int | None = None,
    cpu_root: Path = SYS_CPUS,
) -> Placement:
    """Pick the cores: those asked for, else the asked node's, else the node with most usable
    cores (ties: most free memory). Threads default to one per physical core."""
    by_id = {n.id: n for n in nodes}
    if cpus:
        bad = sorted(set(cpus) - allowed)
        if bad:
            raise ValueError(f"CPUs {format_cpulist(bad)} are not available to this process "
                             f"(allowed: {format_cpulist(allowed)})")
        node = next((n.id for n in nodes if set(cpus) <= set(n.cpus)), nodes[0].id if numa_node is None else numa_node)
        chosen = sorted(cpus)
    elif numa_node is not None:
        if numa_node not in by_id:
            raise ValueError(f"NUMA node {numa_node} does not exist; nodes here: {sorted(by_id)}")
        chosen = sorted(set(by_id[numa_node].cpus) & allowed)
        if not chosen:
            raise ValueError(f"NUMA node {numa_node} has no CPU this process may use")
        node = numa_node
    else:
        best = max(nodes, key=lambda n: (len(set(n.cpus) & allowed), n.mem_free_kb, -n.id))
        node, chosen = best.id, sorted(set(best.cpus) & allowed)
    if threads is None:
        threads = len(physical_cores(chosen, cpu_root))
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return Placement(node, tuple(chosen), threads, len(nodes) > 1)


def apply(placement: Placement) -> None:
    """Pin this process and set the thread environment. Call before importing torch."""
    if "torch" in sys.modules:
        log.warning("torch was imported before pinning: OpenMP may ignore the thread settings")
    os.sched_setaffinity(0, placement.cpus)
    n = str(placement.threads)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = n
    os.environ["OMP_PROC_BIND"] = "close"
    os.environ["OMP_PLACES"] = ",".join(f"{{{c}}}" for c in physical_cores(list(placement.cpus))[: placement.threads])
    # OMP_WAIT_POLICY is left to libgomp's default: spin a while at a barrier, then sleep. Threads
    # spin inside a step (ggml syncs at every op: PASSIVE made a one-token llama.cpp step 45 ms
    # instead of 26, and a torch bf16 step 137 ms instead of 124, DESIGN.md §7) and sleep between
    # steps, so a draft process on the same cores gets them back. A user's own setting wins.
