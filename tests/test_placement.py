"""NUMA topology parsing and core choice on a fake two-node sysfs tree."""

import pytest

from dovetail_rt import placement


@pytest.fixture
def fake_sysfs(tmp_path):
    nodes, cpus = tmp_path / "node", tmp_path / "cpu"
    layout = {0: ("0-3,8-11", 1000), 1: ("4-7,12-15", 5000)}
    for node, (cpulist, free_kb) in layout.items():
        d = nodes / f"node{node}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(cpulist + "\n")
        (d / "meminfo").write_text(f"Node {node} MemTotal:  16000 kB\nNode {node} MemFree:  {free_kb} kB\n")
    (nodes / "possible").write_text("0-1\n")  # not a node folder: ignored
    for cpu in range(16):  # cpus 8-15 are hyper-thread siblings of 0-7
        t = cpus / f"cpu{cpu}" / "topology"
        t.mkdir(parents=True)
        (t / "core_id").write_text(str(cpu % 8))
        (t / "physical_package_id").write_text(str((cpu % 8) // 4))
    return nodes, cpus


def test_parse_cpulist():
    assert placement.parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert placement.format_cpulist([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11"


def test_reads_two_nodes(fake_sysfs):
    nodes = placement.read_numa_nodes(fake_sysfs[0])
    assert [n.id for n in nodes] == [0, 1]
    assert nodes[0].cpus == (0, 1, 2, 3, 8, 9, 10, 11) and nodes[1].mem_free_kb == 5000


def test_default_picks_node_with_most_usable_cores_then_free_memory(fake_sysfs):
    nodes = placement.read_numa_nodes(fake_sysfs[0])
    where = placement.choose(nodes, allowed=set(range(16)), cpu_root=fake_sysfs[1])
    assert where.node == 1  # equal cores, more free memory
    assert where.cpus == (4, 5, 6, 7, 12, 13, 14, 15)
    assert where.threads == 4  # one per physical core
    where = placement.choose(nodes, allowed={0, 1, 2, 4}, cpu_root=fake_sysfs[1])
    assert where.node == 0 and where.cpus == (0, 1, 2)


def test_explicit_node_cpus_threads(fake_sysfs):
    nodes = placement.read_numa_nodes(fake_sysfs[0])
    assert placement.choose(nodes, set(range(16)), numa_node=0, cpu_root=fake_sysfs[1]).cpus == (0, 1, 2, 3, 8, 9, 10, 11)
    where = placement.choose(nodes, set(range(16)), cpus=[5, 6], threads=2, cpu_root=fake_sysfs[1])
    assert (where.node, where.cpus, where.threads) == (1, (5, 6), 2)
    with pytest.raises(ValueError, match="NUMA node 7 does not exist"):
        placement.choose(nodes, set(range(16)), numa_node=7)
    with pytest.raises(ValueError, match="not available"):
        placement.choose(nodes, {0, 1}, cpus=[5])


def test_no_sysfs_falls_back_to_one_node(tmp_path):
    nodes = placement.read_numa_nodes(tmp_path / "missing")
    assert len(nodes) == 1 and nodes[0].cpus
